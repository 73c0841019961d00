//! `report.html`: a self-contained page (inline SVG and CSS, no scripts, no
//! external resources) for a [`CompareReport`], rendered from the minijinja
//! template `templates/compare.html`; the charts' geometry comes from
//! [`super::svg`].

use std::collections::BTreeMap;

use minijinja::{context, Environment};
use serde::Serialize;

use super::svg::{self, Interval, Svg};
use super::{mean_std, pm, share_text, CompareReport, CompareRow};

/// The report's templates, compiled into the binary.
pub(crate) fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, text) in [
        ("svg.html", include_str!("../../templates/svg.html")),
        ("compare.html", include_str!("../../templates/compare.html")),
        ("quality.html", include_str!("../../templates/quality.html")),
    ] {
        env.add_template(name, text)
            .unwrap_or_else(|e| panic!("template {name}: {e}"));
    }
    env
}

#[derive(Serialize)]
struct TableRow {
    method: String,
    cpu: String,
    wall: String,
    peak: String,
    artifact_mb: String,
    share: String,
    test_loss: String,
    metric: String,
    seeds: usize,
}

#[derive(Serialize)]
struct Snip {
    score: String,
    source: String,
    length: u32,
    text: String,
}

#[derive(Serialize)]
struct Family {
    family: String,
    top: Vec<Snip>,
    bottom: Vec<Snip>,
}

fn snips(items: &[crate::methods::Snippet]) -> Vec<Snip> {
    items
        .iter()
        .map(|it| Snip {
            score: format!("{:.4}", it.score),
            source: it.source.clone(),
            length: it.length,
            text: it.text.clone(),
        })
        .collect()
}

/// Each row's test loss minus random's, paired by seed index (the rows run
/// the same seeds in the same order): (mean, std) over the pairs. None when
/// there is no random row.
pub fn loss_vs_random(rows: &[CompareRow]) -> Option<Vec<(String, f64, f64)>> {
    let random = rows.iter().find(|r| r.method == "random")?;
    Some(
        rows.iter()
            .map(|r| {
                let d: Vec<f64> = r
                    .runs
                    .iter()
                    .zip(&random.runs)
                    .map(|(a, b)| a.eval.test_loss - b.eval.test_loss)
                    .filter(|x| x.is_finite())
                    .collect();
                let (m, s) = mean_std(&d);
                (r.method.clone(), m, s)
            })
            .collect(),
    )
}

fn intervals<'a>(
    rows: &'a [&CompareRow],
    f: impl Fn(&CompareRow) -> (f64, f64),
) -> Vec<Interval<'a>> {
    rows.iter()
        .map(|r| {
            let (mean, std) = f(r);
            Interval {
                label: &r.method,
                mean,
                std,
            }
        })
        .collect()
}

/// The self-contained HTML page.
pub fn html(rep: &CompareReport) -> String {
    let rows: Vec<&CompareRow> = rep.rows.iter().collect();
    let table: Vec<TableRow> = rows
        .iter()
        .map(|r| {
            let seeds = r.runs.len();
            TableRow {
                method: r.method.clone(),
                cpu: format!("{:.0}", r.selection_cpu()),
                wall: format!("{:.0}", r.selection_compute()),
                peak: format!("{:.0}", r.peak_mib),
                artifact_mb: format!("{:.1}", r.artifact_bytes as f64 / 1e6),
                share: share_text(&r.selected_by_source),
                test_loss: pm(r.test_loss(), 4, seeds),
                metric: format!("{} {}", r.metric_name(), pm(r.metric(), 3, seeds)),
                seeds,
            }
        })
        .collect();
    let diff: Option<Svg> = loss_vs_random(&rep.rows).map(|d| {
        let iv: Vec<Interval> = d
            .iter()
            .map(|(m, mean, std)| Interval {
                label: m,
                mean: *mean,
                std: *std,
            })
            .collect();
        svg::interval_plot(&iv, Some(0.0), 4)
    });
    let loss = svg::interval_plot(&intervals(&rows, |r| r.test_loss()), None, 4);
    let metric = svg::interval_plot(&intervals(&rows, |r| r.metric()), None, 3);
    let metric_name = rows
        .iter()
        .map(|r| r.metric_name())
        .find(|m| !m.is_empty())
        .unwrap_or("metric");
    let family = |k: &str| k.split('/').next().unwrap_or(k).to_string();
    let by_family = |m: &BTreeMap<String, usize>| -> Vec<(String, usize)> {
        let mut f: BTreeMap<String, usize> = BTreeMap::new();
        for (k, v) in m {
            *f.entry(family(k)).or_default() += v;
        }
        f.into_iter().collect()
    };
    let mut comp = vec![("pool".to_string(), by_family(&rep.pool_by_source))];
    comp.extend(
        rows.iter()
            .filter(|r| !r.selected_by_source.is_empty())
            .map(|r| (r.method.clone(), by_family(&r.selected_by_source))),
    );
    let lengths: Vec<_> = rows
        .iter()
        .filter(|r| !r.selected_lengths.is_empty())
        .map(|r| {
            context! {
                method => r.method.clone(),
                chart => svg::length_plot(&rep.pool_lengths, &r.selected_lengths),
            }
        })
        .collect();
    let series: Vec<(usize, String, Vec<f64>)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let l = &r.runs.first()?.step_losses;
            (!l.is_empty()).then(|| (i, r.method.clone(), l.clone()))
        })
        .collect();
    let curves = (!series.is_empty()).then(|| svg::curves(&series));
    let histograms: Vec<_> = rows
        .iter()
        .filter(|r| !r.selected_scores.is_empty())
        .map(|r| context! { method => r.method.clone(), chart => svg::histogram(&r.selected_scores) })
        .collect();
    let extremes: Vec<_> = rows
        .iter()
        .filter(|r| !r.extremes.is_empty())
        .map(|r| {
            let families: Vec<Family> = r
                .extremes
                .iter()
                .map(|(f, top, bottom)| Family {
                    family: f.clone(),
                    top: snips(top),
                    bottom: snips(bottom),
                })
                .collect();
            context! { method => r.method.clone(), families => families }
        })
        .collect();
    let ctx = context! {
        task => rep.task.clone(),
        pool => rep.pool.clone(),
        pool_size => rep.pool_size,
        budget => rep.budget.clone(),
        lora_rank => rep.train.lora.rank,
        epochs => rep.train.train.epochs,
        lr => format!("{:e}", rep.train.train.lr),
        online_steps => rep.online_steps,
        online_k => (rep.train.train.micro_batch / 2).max(1),
        online_b => rep.train.train.micro_batch,
        table => table,
        diff => diff,
        loss => loss,
        metric => metric,
        metric_name => metric_name,
        composition => svg::stacked_shares(&comp),
        lengths => lengths,
        curves => curves,
        histograms => histograms,
        extremes => extremes,
    };
    templates()
        .get_template("compare.html")
        .and_then(|t| t.render(ctx))
        .unwrap_or_else(|e| panic!("rendering compare.html: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::super::{RowKind, SeedRun};
    use super::*;
    use crate::evaluate::{EvalResult, TrainOnSelection};
    use crate::methods::Snippet;

    fn row(method: &str, losses: &[f64]) -> CompareRow {
        CompareRow {
            method: method.into(),
            kind: RowKind::Static,
            runs: losses
                .iter()
                .enumerate()
                .map(|(i, &l)| SeedRun {
                    seed: i as u64,
                    selection_seconds: 1.0,
                    selection_compute_seconds: 2.0,
                    selection_cpu_seconds: 3.0,
                    train_seconds: 4.0,
                    eval: EvalResult {
                        task: "mmlu".into(),
                        test_loss: l,
                        metric_name: "accuracy".into(),
                        metric: 0.25,
                        per_subtask: BTreeMap::new(),
                        n: 4,
                        seconds: 1.0,
                    },
                    step_losses: vec![2.0, 1.5, 1.2],
                })
                .collect(),
            peak_mib: 10.0,
            artifact_bytes: 5,
            selected_by_source: [
                ("t0/x".to_string(), 3usize),
                ("flan_v2_cot/y".to_string(), 1),
            ]
            .into_iter()
            .collect(),
            selected_scores: vec![0.1, 0.2, 0.3],
            selected_lengths: vec![10, 20, 30, 40],
            extremes: vec![(
                "t0".into(),
                vec![Snippet {
                    id: "a".into(),
                    source: "t0/x".into(),
                    score: 1.0,
                    length: 10,
                    text: "<script>alert(1)</script>".into(),
                }],
                vec![],
            )],
        }
    }

    fn report(rows: Vec<CompareRow>) -> CompareReport {
        CompareReport {
            task: "mmlu".into(),
            pool: "default".into(),
            pool_size: 6,
            budget: "Fraction(0.05)".into(),
            pool_lengths: vec![5, 10, 20, 30, 40, 200],
            pool_by_source: [("t0/x".to_string(), 6usize)].into_iter().collect(),
            train: TrainOnSelection::cpu(),
            online_steps: 50,
            rows,
        }
    }

    #[test]
    fn report_is_self_contained_and_escapes_text() {
        let h = html(&report(vec![row("a<b", &[1.5])]));
        assert!(h.contains("a&lt;b") && !h.contains("a<b"));
        assert!(h.contains("&lt;script&gt;"), "example text is escaped");
        assert!(
            !h.contains("<script") && !h.contains("<link") && !h.contains("src="),
            "no scripts or external resources"
        );
        for section in [
            "Length distribution",
            "Training loss",
            "lowest-scored",
            "composition",
        ] {
            assert!(h.contains(section), "missing section {section}");
        }
        assert!(h.contains("<polyline"), "a loss curve is drawn");
    }

    #[test]
    fn seeds_show_mean_and_spread() {
        let h = html(&report(vec![row("random", &[1.0, 2.0, 3.0])]));
        assert!(
            h.contains("2.0000 ± 1.0000"),
            "mean ± sample std in the table"
        );
    }

    #[test]
    fn losses_are_compared_with_random_seed_by_seed() {
        let rows = vec![
            row("random", &[9.52, 9.50, 9.55]),
            row("tov", &[9.45, 9.46, 9.47]),
        ];
        let d = loss_vs_random(&rows).unwrap();
        assert_eq!(d[0], ("random".to_string(), 0.0, 0.0));
        // Paired differences: −0.07, −0.04, −0.08 → mean −0.0633, std 0.0208.
        assert!((d[1].1 + 0.19 / 3.0).abs() < 1e-9, "{d:?}");
        assert!((d[1].2 - 0.020_816_66).abs() < 1e-6, "{d:?}");
        let h = html(&report(rows));
        assert!(h.contains("difference to random"), "the chart is there");
        assert!(h.contains("stroke-dasharray"), "with its zero line");
        assert!(h.contains("-0.0633 ± 0.0208"), "and its value");
        assert!(loss_vs_random(&[row("tov", &[1.0])]).is_none());
    }
}
