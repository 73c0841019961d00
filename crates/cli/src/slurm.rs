//! `dsel slurm`: one selection sharded over a Slurm cluster.
//!
//! Writes three batch scripts and a submitter into one folder:
//! `prepare.sbatch` (`dsel select … --prepare`: ingest, tokenize and the
//! small shared stages), `shard.sbatch` (a job array, task `i` running
//! `dsel select … --shard i/N`) and `merge.sbatch` (`dsel merge …`:
//! assembles every pool-wide stage from the workers' units and selects).
//! `submit.sh` submits them chained with `--dependency=afterok`, so one
//! command scales a selection to N nodes; `--submit` runs it.
//!
//! Every job reads and writes one cache (`--cache`, absolute), which must be
//! on a filesystem all nodes share. Workers write disjoint unit files and
//! never build a shared artifact, so nothing depends on locks across nodes
//! (ARCHITECTURE.md, "Sharded runs").

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};

use crate::{at_least_one, task_name, Global, SelectArgs};

/// `dsel slurm` options.
#[derive(Args, Debug)]
pub struct SlurmArgs {
    /// Shard workers: the job array's size (each computes the units u of
    /// every pool-wide stage with u mod N = its index).
    #[arg(long, value_parser = at_least_one)]
    shards: usize,
    /// Partition of every job (sbatch --partition); default: the cluster's.
    #[arg(long)]
    partition: Option<String>,
    /// GPUs per task of every job (sbatch --gpus-per-task).
    #[arg(long)]
    gpus_per_task: Option<u32>,
    /// CPUs per task of every job (sbatch --cpus-per-task; also the jobs' RAYON_NUM_THREADS).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    cpus_per_task: usize,
    /// Memory per job (sbatch --mem), e.g. 16G.
    #[arg(long)]
    mem: Option<String>,
    /// Time limit per job (sbatch --time), e.g. 04:00:00.
    #[arg(long)]
    time: Option<String>,
    /// Account (sbatch --account).
    #[arg(long)]
    account: Option<String>,
    /// More sbatch options for every job, one per use (e.g. --sbatch=--qos=high).
    #[arg(long = "sbatch", value_name = "OPTION")]
    sbatch: Vec<String>,
    /// Folder of the scripts and the jobs' logs. Default: runs/slurm/<task>-<method>.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The dsel binary the jobs run. Default: this one.
    #[arg(long)]
    dsel: Option<PathBuf>,
    /// Submit the jobs (prepare, then the array, then the merge, each after
    /// the previous succeeded) and print their ids.
    #[arg(long)]
    submit: bool,
    /// The selection's `dsel select` options, after `--` (e.g. `-- --task
    /// mmlu --method tov`); --prepare and --shard are added per job.
    #[arg(last = true, required = true)]
    select_args: Vec<String>,
}

/// `dsel select`'s arguments parsed on their own, to validate them here.
#[derive(Parser, Debug)]
struct SelectOnly {
    #[command(flatten)]
    a: SelectArgs,
}

/// A word quoted for bash: as it is when it is plainly safe, else in single quotes.
fn quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+%@".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// An absolute spelling of `p` (relative to the current folder), without
/// requiring it to exist.
fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current folder")?
            .join(p)
    })
}

/// The three job scripts and the submitter, as (file name, contents).
fn scripts(g: &Global, a: &SlurmArgs, name: &str, dir: &Path) -> Result<Vec<(String, String)>> {
    let cwd = std::env::current_dir().context("reading the current folder")?;
    let dsel = match &a.dsel {
        Some(d) => absolute(d)?,
        None => std::env::current_exe().context("locating the dsel binary")?,
    };
    let precision = crate::value_name(&g.precision);
    let args: Vec<String> = a.select_args.iter().map(|w| quote(w)).collect();
    let args = args.join(" ");
    let logs = dir.join("logs");
    let cache = quote(&absolute(&g.cache)?.display().to_string());
    let data = quote(&absolute(&g.data_root)?.display().to_string());
    let n = a.shards;
    let header = |job: &str| -> String {
        let mut h = String::from("#!/bin/bash\n");
        let mut opt = |o: String| {
            let _ = writeln!(h, "#SBATCH {o}");
        };
        let log = if job == "shard" {
            opt(format!("--array=0-{}", n - 1));
            format!("{job}-%A_%a.out")
        } else {
            format!("{job}-%j.out")
        };
        opt(format!(
            "--job-name={}",
            quote(&format!("dsel-{name}-{job}"))
        ));
        opt(format!(
            "--output={}",
            quote(&logs.join(log).display().to_string())
        ));
        opt(format!("--chdir={}", quote(&cwd.display().to_string())));
        opt("--ntasks=1".into());
        opt(format!("--cpus-per-task={}", a.cpus_per_task));
        if let Some(p) = &a.partition {
            opt(format!("--partition={}", quote(p)));
        }
        if let Some(n) = a.gpus_per_task {
            opt(format!("--gpus-per-task={n}"));
        }
        if let Some(m) = &a.mem {
            opt(format!("--mem={}", quote(m)));
        }
        if let Some(t) = &a.time {
            opt(format!("--time={}", quote(t)));
        }
        if let Some(acc) = &a.account {
            opt(format!("--account={}", quote(acc)));
        }
        for o in &a.sbatch {
            opt(quote(o));
        }
        let _ = write!(
            h,
            "set -euo pipefail\n\
             export DSEL_CACHE={cache}\n\
             export DSEL_DATA_ROOT={data}\n\
             export DSEL_PRECISION={precision}\n\
             export RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-{cpus}}}\"\n",
            cpus = a.cpus_per_task,
        );
        h
    };
    let bin = quote(&dsel.display().to_string());
    let prepare = format!("{}exec {bin} select {args} --prepare\n", header("prepare"));
    let shard = format!(
        "{}exec {bin} select {args} --shard \"${{SLURM_ARRAY_TASK_ID}}/{n}\"\n",
        header("shard")
    );
    let merge = format!("{}exec {bin} merge {args}\n", header("merge"));
    let d = quote(&dir.display().to_string());
    let submit = format!(
        "#!/bin/bash\n\
         # Submits the sharded selection: prepare, then {n} shard workers, then the merge,\n\
         # each only after the previous succeeded. Prints the three job ids.\n\
         set -euo pipefail\n\
         prepare=$(sbatch --parsable {d}/prepare.sbatch)\n\
         prepare=${{prepare%%;*}}\n\
         shards=$(sbatch --parsable --dependency=afterok:$prepare {d}/shard.sbatch)\n\
         shards=${{shards%%;*}}\n\
         merge=$(sbatch --parsable --dependency=afterok:$shards {d}/merge.sbatch)\n\
         merge=${{merge%%;*}}\n\
         echo \"prepare=$prepare shards=$shards merge=$merge\"\n"
    );
    Ok(vec![
        ("prepare.sbatch".into(), prepare),
        ("shard.sbatch".into(), shard),
        ("merge.sbatch".into(), merge),
        ("submit.sh".into(), submit),
    ])
}

/// Runs `dsel slurm`.
pub fn run(g: &Global, a: SlurmArgs) -> Result<()> {
    let mut argv = vec!["dsel-select".to_string()];
    argv.extend(a.select_args.iter().cloned());
    let sel = SelectOnly::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("options after `--` (those of `dsel select`): {e}"))?;
    if sel.a.part.work() != dsel_pipeline::Work::All {
        bail!(
            "options after `--`: leave out --prepare, --shard and --merge; each job adds its own"
        );
    }
    let run = &sel.a.run;
    let name = format!("{}-{}", task_name(&run.opts.task)?, run.method.name());
    if !run.method.implementation().pool_wide() {
        tracing::warn!(
            "{} has no pool-wide stage: its shard workers have nothing to do and the merge job does all of the work",
            run.method.name()
        );
    }
    let dir = absolute(
        &a.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs/slurm").join(&name)),
    )?;
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("creating {}", dir.join("logs").display()))?;
    for (file, text) in scripts(g, &a, &name, &dir)? {
        let path = dir.join(&file);
        dsel_store::atomic_write(&path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", path.display()))?;
        }
    }
    println!(
        "wrote {0}/prepare.sbatch, {0}/shard.sbatch (array of {1}), {0}/merge.sbatch and {0}/submit.sh",
        dir.display(),
        a.shards
    );
    if !a.submit {
        println!("submit with: bash {}/submit.sh", dir.display());
        return Ok(());
    }
    let out = std::process::Command::new("bash")
        .arg(dir.join("submit.sh"))
        .output()
        .context("running submit.sh (is sbatch on PATH?)")?;
    if !out.status.success() {
        bail!(
            "submitting the jobs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("logs: {}/logs/", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_bash_only_when_needed() {
        assert_eq!(quote("--task"), "--task");
        assert_eq!(quote("runs/a b"), "'runs/a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
