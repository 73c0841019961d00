//! `report.html`: a self-contained page (inline SVG and CSS, no scripts, no
//! external resources) for a [`CompareReport`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{pm, share_text, CompareReport, CompareRow};

const PALETTE: [&str; 10] = [
    "#4a7ebb", "#d9813a", "#5aa55a", "#c44e52", "#8c6bb1", "#8c564b", "#d67ab1", "#7f7f7f",
    "#b5b83b", "#3bb5c4",
];

fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Horizontal bars with an optional ± whisker.
fn bars(labels: &[String], values: &[(f64, f64)], digits: usize) -> String {
    let finite = values.iter().filter(|v| v.0.is_finite());
    let max = finite
        .map(|v| v.0 + v.1.max(0.0))
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let h = 22 * labels.len() + 10;
    let mut s = format!(
        "<svg width=\"720\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">"
    );
    for (i, (l, &(v, sd))) in labels.iter().zip(values).enumerate() {
        let y = 5 + 22 * i;
        let scale = |x: f64| (400.0 * x / max).max(0.0);
        let w = if v.is_finite() { scale(v) } else { 0.0 };
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text><rect x=\"190\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"{}\"/>",
            y + 12,
            esc(l),
            color(i)
        );
        if sd > 0.0 && v.is_finite() {
            let (a, b) = (190.0 + scale(v - sd), 190.0 + scale(v + sd));
            let _ = write!(
                s,
                "<line x1=\"{a:.1}\" x2=\"{b:.1}\" y1=\"{m}\" y2=\"{m}\" stroke=\"#000\"/><line x1=\"{a:.1}\" x2=\"{a:.1}\" y1=\"{t}\" y2=\"{u}\" stroke=\"#000\"/><line x1=\"{b:.1}\" x2=\"{b:.1}\" y1=\"{t}\" y2=\"{u}\" stroke=\"#000\"/>",
                m = y + 8,
                t = y + 3,
                u = y + 13
            );
        }
        let label = if sd > 0.0 {
            format!("{v:.digits$} ± {sd:.digits$}")
        } else {
            format!("{v:.digits$}")
        };
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{}</text>",
            200.0 + w.max(if sd > 0.0 { scale(v + sd) } else { 0.0 }),
            y + 12,
            esc(&label)
        );
    }
    s.push_str("</svg>");
    s
}

/// One stacked bar per row: the share of each source family.
fn composition(rows: &[&CompareRow]) -> String {
    let mut families: Vec<String> = rows
        .iter()
        .flat_map(|r| r.selected_by_source.keys())
        .map(|k| k.split('/').next().unwrap_or(k).to_string())
        .collect();
    families.sort();
    families.dedup();
    let h = 22 * rows.len() + 40;
    let mut s = format!(
        "<svg width=\"720\" height=\"{h}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 5 + 22 * i;
        let total: usize = r.selected_by_source.values().sum();
        let mut fam: BTreeMap<&str, usize> = BTreeMap::new();
        for (k, v) in &r.selected_by_source {
            *fam.entry(k.split('/').next().unwrap_or(k)).or_default() += v;
        }
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{} (n={total})</text>",
            y + 12,
            esc(&r.method)
        );
        let mut x = 190.0;
        for (fi, f) in families.iter().enumerate() {
            let w = 500.0 * *fam.get(f.as_str()).unwrap_or(&0) as f64 / total.max(1) as f64;
            if w > 0.0 {
                let _ = write!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"{}\"><title>{}: {:.0}%</title></rect>",
                    color(fi),
                    esc(f),
                    100.0 * w / 500.0
                );
            }
            x += w;
        }
    }
    let ly = 22 * rows.len() + 25;
    for (fi, f) in families.iter().enumerate() {
        let x = 190 + 130 * fi;
        let _ = write!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>",
            ly - 10,
            color(fi),
            x + 16,
            ly,
            esc(f)
        );
    }
    s.push_str("</svg>");
    s
}

/// Share of `values` in each of `bins` equal-width bins over `[0, hi]`.
fn shares(values: &[u32], hi: u32, bins: usize) -> Vec<f64> {
    let mut c = vec![0usize; bins];
    for &v in values {
        let b = (v as usize * bins) / (hi as usize + 1);
        c[b.min(bins - 1)] += 1;
    }
    let n = values.len().max(1) as f64;
    c.into_iter().map(|x| x as f64 / n).collect()
}

/// Pool vs selected length distribution, side-by-side bars per bin.
fn length_plot(pool: &[u32], selected: &[u32]) -> String {
    let hi = pool
        .iter()
        .chain(selected)
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let bins = 12;
    let (a, b) = (shares(pool, hi, bins), shares(selected, hi, bins));
    let max = a.iter().chain(&b).cloned().fold(1e-12, f64::max);
    let mut s = String::from(
        "<svg width=\"560\" height=\"150\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">",
    );
    for i in 0..bins {
        let x = 10 + 44 * i;
        for (j, (v, c)) in [(a[i], "#bbb"), (b[i], "#4a7ebb")].iter().enumerate() {
            let h = 110.0 * v / max;
            let _ = write!(
                s,
                "<rect x=\"{}\" y=\"{:.1}\" width=\"18\" height=\"{h:.1}\" fill=\"{c}\"/>",
                x + 20 * j,
                120.0 - h
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"10\" y=\"138\" font-size=\"10\">0</text><text x=\"490\" y=\"138\" font-size=\"10\">{hi} tokens</text><rect x=\"200\" y=\"128\" width=\"10\" height=\"10\" fill=\"#bbb\"/><text x=\"214\" y=\"138\" font-size=\"10\">pool</text><rect x=\"250\" y=\"128\" width=\"10\" height=\"10\" fill=\"#4a7ebb\"/><text x=\"264\" y=\"138\" font-size=\"10\">selected</text></svg>"
    );
    s
}

/// Training-loss curves (first seed of each row), one polyline per row.
fn loss_curves(rows: &[&CompareRow]) -> String {
    let curves: Vec<(usize, &CompareRow, &Vec<f64>)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.runs
                .first()
                .map(|x| &x.step_losses)
                .filter(|l| !l.is_empty())
                .map(|l| (i, *r, l))
        })
        .collect();
    if curves.is_empty() {
        return "<p>(no training curves)</p>".into();
    }
    let max_steps = curves.iter().map(|c| c.2.len()).max().unwrap_or(1).max(2);
    let all = curves.iter().flat_map(|c| c.2.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let span = (hi - lo).max(1e-9);
    let (w, h, left, top) = (560.0, 220.0, 50.0, 10.0);
    let mut s = format!(
        "<svg width=\"760\" height=\"{}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\"><rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#ccc\"/>",
        h + 40.0
    );
    for (i, r, l) in &curves {
        let pts: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(k, v)| {
                format!(
                    "{:.1},{:.1}",
                    left + w * k as f64 / (max_steps - 1) as f64,
                    top + h * (1.0 - (v - lo) / span)
                )
            })
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>",
            color(*i),
            pts.join(" "),
            esc(&r.method)
        );
    }
    for (j, (i, r, _)) in curves.iter().enumerate() {
        let y = top + 12.0 + 16.0 * j as f64;
        let _ = write!(
            s,
            "<rect x=\"620\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{}\"/><text x=\"636\" y=\"{:.1}\" font-size=\"11\">{}</text>",
            y - 4.0,
            color(*i),
            y,
            esc(&r.method)
        );
    }
    let _ = write!(
        s,
        "<text x=\"4\" y=\"{:.1}\" font-size=\"10\">{hi:.2}</text><text x=\"4\" y=\"{:.1}\" font-size=\"10\">{lo:.2}</text><text x=\"{left}\" y=\"{:.1}\" font-size=\"10\">step 1</text><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">step {max_steps}</text></svg>",
        top + 10.0,
        top + h,
        top + h + 16.0,
        left + w - 40.0,
        top + h + 16.0
    );
    s
}

fn histogram(scores: &[f64]) -> String {
    let v: Vec<f64> = scores.iter().cloned().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "<p>(no scores: the method does not score examples)</p>".into();
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let bins = 20;
    let mut counts = vec![0usize; bins];
    for x in &v {
        let b = if hi > lo {
            (((x - lo) / (hi - lo)) * bins as f64) as usize
        } else {
            0
        };
        counts[b.min(bins - 1)] += 1;
    }
    let maxc = *counts.iter().max().unwrap_or(&1) as f64;
    let mut s = String::from(
        "<svg width=\"420\" height=\"120\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">",
    );
    for (i, c) in counts.iter().enumerate() {
        let h = 100.0 * *c as f64 / maxc;
        let _ = write!(
            s,
            "<rect x=\"{}\" y=\"{:.1}\" width=\"18\" height=\"{h:.1}\" fill=\"#bb7e4a\"/>",
            10 + 20 * i,
            105.0 - h
        );
    }
    let _ = write!(s, "<text x=\"10\" y=\"118\" font-size=\"10\">{lo:.3}</text><text x=\"360\" y=\"118\" font-size=\"10\">{hi:.3}</text></svg>");
    s
}

fn snippet_list(items: &[crate::methods::Snippet]) -> String {
    let mut s = String::from("<ol>");
    for it in items {
        let _ = write!(
            s,
            "<li><b>{:.4}</b> <code>{}</code> ({} tokens)<pre>{}</pre></li>",
            it.score,
            esc(&it.source),
            it.length,
            esc(&it.text)
        );
    }
    s.push_str("</ol>");
    s
}

/// The self-contained HTML page.
pub fn html(rep: &CompareReport) -> String {
    let mut s = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dsel compare</title><style>body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;font-size:12px;max-height:12em;overflow:auto}details{margin:0.4em 0}.note{color:#555;font-size:13px}</style></head><body>",
    );
    let _ = write!(
        s,
        "<h1>Method comparison: {}</h1><p class=\"note\">Pool <code>{}</code>: {} candidates; budget {}. Every selection is fine-tuned with LoRA r={} on {} epoch(s) at lr {:e}; online selectors train {} steps of {} of {} candidates. Selection CPU and wall seconds are the recorded build costs of the artifacts each selection depends on (its cost from a clean cache, shared stages counted for each method that uses them).</p>",
        esc(&rep.task),
        esc(&rep.pool),
        rep.pool_size,
        esc(&rep.budget),
        rep.train.lora.rank,
        rep.train.train.epochs,
        rep.train.train.lr,
        rep.online_steps,
        (rep.train.train.micro_batch / 2).max(1),
        rep.train.train.micro_batch
    );
    s.push_str("<table><tr><th>method</th><th>selection CPU s</th><th>selection wall s</th><th>peak MiB</th><th>artifact MB</th><th>selected share</th><th>test loss</th><th>metric</th><th>seeds</th></tr>");
    for r in &rep.rows {
        let seeds = r.runs.len();
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td></tr>",
            esc(&r.method),
            r.selection_cpu(),
            r.selection_compute(),
            r.peak_mib,
            r.artifact_bytes as f64 / 1e6,
            esc(&share_text(&r.selected_by_source)),
            pm(r.test_loss(), 4, seeds),
            esc(r.metric_name()),
            pm(r.metric(), 3, seeds),
            seeds
        );
    }
    s.push_str("</table>");

    let rows: Vec<&CompareRow> = rep.rows.iter().collect();
    let labels: Vec<String> = rows.iter().map(|r| r.method.clone()).collect();
    s.push_str(
        "<h2>Target test loss after fine-tuning (lower is better; mean ± std over seeds)</h2>",
    );
    s.push_str(&bars(
        &labels,
        &rows.iter().map(|r| r.test_loss()).collect::<Vec<_>>(),
        4,
    ));
    let metric = rows
        .iter()
        .map(|r| r.metric_name())
        .find(|m| !m.is_empty())
        .unwrap_or("metric");
    let _ = write!(s, "<h2>Task metric: {}</h2>", esc(metric));
    s.push_str(&bars(
        &labels,
        &rows.iter().map(|r| r.metric()).collect::<Vec<_>>(),
        3,
    ));

    let with_sel: Vec<&CompareRow> = rows
        .iter()
        .copied()
        .filter(|r| !r.selected_by_source.is_empty())
        .collect();
    s.push_str("<h2>Selection composition by source family</h2>");
    let mut pool_row = CompareRow::new("pool", super::RowKind::Reference);
    pool_row.selected_by_source = rep.pool_by_source.clone();
    let mut comp_rows = vec![&pool_row];
    comp_rows.extend(with_sel.iter().copied());
    s.push_str(&composition(&comp_rows));

    s.push_str("<h2>Length distribution: selected vs pool (share of examples per length bin)</h2>");
    for r in rows.iter().filter(|r| !r.selected_lengths.is_empty()) {
        let _ = write!(
            s,
            "<h3>{}</h3>{}",
            esc(&r.method),
            length_plot(&rep.pool_lengths, &r.selected_lengths)
        );
    }

    s.push_str("<h2>Training loss per optimizer step (first seed)</h2>");
    s.push_str(&loss_curves(&rows));

    s.push_str("<h2>Score histograms of the selected examples</h2>");
    for r in rows.iter().filter(|r| !r.selected_scores.is_empty()) {
        let _ = write!(
            s,
            "<h3>{}</h3>{}",
            esc(&r.method),
            histogram(&r.selected_scores)
        );
    }

    s.push_str("<h2>Highest- and lowest-scored pool examples per source family</h2>");
    for r in rows.iter().filter(|r| !r.extremes.is_empty()) {
        let _ = write!(s, "<h3>{}</h3>", esc(&r.method));
        for (fam, top, bottom) in &r.extremes {
            let _ = write!(
                s,
                "<details><summary>{}: top {} / bottom {}</summary><h4>top</h4>{}<h4>bottom</h4>{}</details>",
                esc(fam),
                top.len(),
                bottom.len(),
                snippet_list(top),
                snippet_list(bottom)
            );
        }
    }
    s.push_str("</body></html>\n");
    s
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
    fn length_shares_sum_to_one_and_bin_the_maximum_last() {
        let s = shares(&[0, 5, 10, 10], 10, 5);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(s[4], 0.5);
        assert_eq!(s[0], 0.25);
    }
}
