//! Chart geometry for the HTML reports: every chart is computed here as a
//! list of plain shapes (positions in pixels, colours, labels), which the
//! minijinja templates draw as inline SVG. Keeping the numbers in Rust lets
//! the tests check the drawing itself (bar lengths, tick labels) without a
//! browser.

use serde::Serialize;

/// Colours of the series, in order.
pub const PALETTE: [&str; 10] = [
    "#4a7ebb", "#d9813a", "#5aa55a", "#c44e52", "#8c6bb1", "#8c564b", "#d67ab1", "#7f7f7f",
    "#b5b83b", "#3bb5c4",
];

/// The colour of series `i`.
pub fn color(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// One drawn element.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Shape {
    /// A filled rectangle (with a hover title when `title` is not empty).
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: String,
        title: String,
    },
    /// A line segment.
    Line {
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        stroke: String,
        dash: bool,
    },
    /// A circle.
    Circle {
        x: f64,
        y: f64,
        r: f64,
        fill: String,
        title: String,
    },
    /// A polyline through `points` (`"x,y x,y …"`).
    Polyline {
        points: String,
        stroke: String,
        title: String,
    },
    /// Text; `anchor` is `start`, `middle` or `end`.
    Text {
        x: f64,
        y: f64,
        size: u32,
        anchor: String,
        text: String,
    },
}

/// An SVG canvas and what is drawn on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Svg {
    /// Width in pixels.
    pub width: f64,
    /// Height in pixels.
    pub height: f64,
    /// Shapes in drawing order.
    pub shapes: Vec<Shape>,
}

impl Svg {
    fn new(width: f64, height: f64) -> Self {
        Svg {
            width,
            height,
            shapes: Vec::new(),
        }
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: impl Into<String>) {
        self.shapes.push(Shape::Rect {
            x,
            y,
            w: w.max(0.0),
            h: h.max(0.0),
            fill: fill.into(),
            title: title.into(),
        });
    }

    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str, dash: bool) {
        self.shapes.push(Shape::Line {
            x1,
            y1,
            x2,
            y2,
            stroke: stroke.into(),
            dash,
        });
    }

    fn text(&mut self, x: f64, y: f64, size: u32, anchor: &str, text: impl Into<String>) {
        self.shapes.push(Shape::Text {
            x,
            y,
            size,
            anchor: anchor.into(),
            text: text.into(),
        });
    }

    /// The texts drawn, in order (for tests).
    pub fn texts(&self) -> Vec<&str> {
        self.shapes
            .iter()
            .filter_map(|s| match s {
                Shape::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// About `n` round tick values (steps of 1, 2 or 5 × 10^k) covering
/// `[lo, hi]`, the first ≤ lo and the last ≥ hi.
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        let pad = lo.abs().max(1.0) * 0.05;
        (lo - pad, hi + pad)
    };
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    // A bound on a tick stays that tick despite rounding (9.44 / 0.02).
    let first = (lo / step + 1e-9).floor() as i64;
    let last = (hi / step - 1e-9).ceil() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// Digits that tell ticks `step` apart.
fn tick_digits(ticks: &[f64]) -> usize {
    match ticks {
        [a, b, ..] => ((-(b - a).abs().log10()).ceil().max(0.0)) as usize,
        _ => 2,
    }
}

/// One row of an [`interval_plot`]: a label and (mean, std), NaN for none.
pub struct Interval<'a> {
    /// Row label.
    pub label: &'a str,
    /// Mean.
    pub mean: f64,
    /// Standard deviation over seeds (0 = one seed).
    pub std: f64,
}

/// Left edge and width of the plotting area of [`interval_plot`].
pub const PLOT_LEFT: f64 = 200.0;
/// Width of the plotting area of [`interval_plot`].
pub const PLOT_WIDTH: f64 = 420.0;

/// A dot per row at its mean with a mean ± std whisker, on an axis that
/// spans the values (not from zero), with labelled ticks; `reference` draws
/// a dashed vertical line (e.g. 0 for differences). The value and spread
/// are printed beside each row.
pub fn interval_plot(rows: &[Interval], reference: Option<f64>, digits: usize) -> Svg {
    let row_h = 22.0;
    let top = 8.0;
    let height = top + row_h * rows.len() as f64 + 34.0;
    let mut svg = Svg::new(PLOT_LEFT + PLOT_WIDTH + 140.0, height);
    let finite: Vec<&Interval> = rows.iter().filter(|r| r.mean.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), r| {
            let s = if r.std.is_finite() { r.std } else { 0.0 };
            (a.min(r.mean - s), b.max(r.mean + s))
        });
    if let Some(r) = reference {
        lo = lo.min(r);
        hi = hi.max(r);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let ticks = nice_ticks(lo, hi, 5);
    let (t0, t1) = (ticks[0], *ticks.last().unwrap_or(&ticks[0]));
    let span = (t1 - t0).max(1e-300);
    let x = |v: f64| PLOT_LEFT + PLOT_WIDTH * (v - t0) / span;
    let axis_y = top + row_h * rows.len() as f64 + 4.0;
    let td = tick_digits(&ticks);
    for &t in &ticks {
        svg.line((x(t), top), (x(t), axis_y), "#e4e4e4", false);
        svg.line((x(t), axis_y), (x(t), axis_y + 4.0), "#444", false);
        svg.text(x(t), axis_y + 16.0, 10, "middle", format!("{t:.td$}"));
    }
    svg.line(
        (PLOT_LEFT, axis_y),
        (PLOT_LEFT + PLOT_WIDTH, axis_y),
        "#444",
        false,
    );
    if let Some(r) = reference {
        svg.line((x(r), top - 4.0), (x(r), axis_y), "#444", true);
    }
    for (i, r) in rows.iter().enumerate() {
        let cy = top + row_h * i as f64 + row_h / 2.0;
        svg.text(0.0, cy + 4.0, 12, "start", r.label);
        if !r.mean.is_finite() {
            svg.text(PLOT_LEFT, cy + 4.0, 11, "start", "—");
            continue;
        }
        let c = color(i);
        if r.std > 0.0 && r.std.is_finite() {
            let (a, b) = (x(r.mean - r.std), x(r.mean + r.std));
            svg.line((a, cy), (b, cy), "#000", false);
            svg.line((a, cy - 5.0), (a, cy + 5.0), "#000", false);
            svg.line((b, cy - 5.0), (b, cy + 5.0), "#000", false);
        }
        let label = if r.std > 0.0 {
            format!("{:.digits$} ± {:.digits$}", r.mean, r.std)
        } else {
            format!("{:.digits$}", r.mean)
        };
        svg.shapes.push(Shape::Circle {
            x: x(r.mean),
            y: cy,
            r: 5.0,
            fill: c.into(),
            title: format!("{}: {label}", r.label),
        });
        svg.text(PLOT_LEFT + PLOT_WIDTH + 12.0, cy + 4.0, 11, "start", label);
    }
    svg
}

/// One stacked horizontal bar per row (label, count by group): each group's
/// share, with a legend.
pub fn stacked_shares(rows: &[(String, Vec<(String, usize)>)]) -> Svg {
    let mut groups: Vec<&str> = rows
        .iter()
        .flat_map(|(_, g)| g.iter().map(|(k, _)| k.as_str()))
        .collect();
    groups.sort();
    groups.dedup();
    let mut svg = Svg::new(720.0, 22.0 * rows.len() as f64 + 40.0);
    for (i, (label, counts)) in rows.iter().enumerate() {
        let y = 5.0 + 22.0 * i as f64;
        let total: usize = counts.iter().map(|c| c.1).sum();
        svg.text(0.0, y + 12.0, 12, "start", format!("{label} (n={total})"));
        let mut x = 190.0;
        for (gi, g) in groups.iter().enumerate() {
            let n: usize = counts.iter().filter(|c| c.0 == *g).map(|c| c.1).sum();
            let w = 500.0 * n as f64 / total.max(1) as f64;
            if w > 0.0 {
                svg.rect(x, y, w, 16.0, color(gi), format!("{g}: {:.0}%", w / 5.0));
            }
            x += w;
        }
    }
    let ly = 22.0 * rows.len() as f64 + 25.0;
    for (gi, g) in groups.iter().enumerate() {
        let x = 190.0 + 130.0 * gi as f64;
        svg.rect(x, ly - 10.0, 12.0, 12.0, color(gi), "");
        svg.text(x + 16.0, ly, 12, "start", *g);
    }
    svg
}

/// Share of `values` in each of `bins` equal-width bins over `[0, hi]`.
pub fn shares(values: &[u32], hi: u32, bins: usize) -> Vec<f64> {
    let mut c = vec![0usize; bins];
    for &v in values {
        let b = (v as usize * bins) / (hi as usize + 1);
        c[b.min(bins - 1)] += 1;
    }
    let n = values.len().max(1) as f64;
    c.into_iter().map(|x| x as f64 / n).collect()
}

/// Pool vs selected length distribution: side-by-side bars per length bin,
/// with the bins' token ranges and share ticks labelled.
pub fn length_plot(pool: &[u32], selected: &[u32]) -> Svg {
    let hi = pool
        .iter()
        .chain(selected)
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let bins = 12;
    let (a, b) = (shares(pool, hi, bins), shares(selected, hi, bins));
    let ticks = nice_ticks(0.0, a.iter().chain(&b).cloned().fold(1e-12, f64::max), 4);
    let top_share = *ticks.last().unwrap_or(&1.0);
    let (left, base, h) = (44.0, 130.0, 110.0);
    let mut svg = Svg::new(620.0, 175.0);
    for &t in &ticks {
        let y = base - h * t / top_share;
        svg.line(
            (left - 4.0, y),
            (left + 44.0 * bins as f64, y),
            "#e4e4e4",
            false,
        );
        svg.text(left - 6.0, y + 3.0, 10, "end", format!("{:.0}%", 100.0 * t));
    }
    for i in 0..bins {
        let x = left + 44.0 * i as f64;
        for (j, (v, c, who)) in [(a[i], "#bbb", "pool"), (b[i], "#4a7ebb", "selected")]
            .iter()
            .enumerate()
        {
            let bh = h * v / top_share;
            svg.rect(
                x + 2.0 + 20.0 * j as f64,
                base - bh,
                18.0,
                bh,
                c,
                format!("{who}: {:.1}%", 100.0 * v),
            );
        }
    }
    let edge = |i: usize| (i * (hi as usize + 1)) / bins;
    for i in (0..=bins).step_by(3) {
        svg.text(
            left + 44.0 * i as f64,
            base + 14.0,
            10,
            "middle",
            edge(i).to_string(),
        );
    }
    svg.text(left + 44.0 * bins as f64, base + 28.0, 10, "end", "tokens");
    svg.rect(200.0, base + 20.0, 10.0, 10.0, "#bbb", "");
    svg.text(214.0, base + 29.0, 10, "start", "pool");
    svg.rect(250.0, base + 20.0, 10.0, 10.0, "#4a7ebb", "");
    svg.text(264.0, base + 29.0, 10, "start", "selected");
    svg
}

/// Line charts of `(label, values per step)`, coloured by their index in
/// the full row list, with labelled ticks on both axes and a legend.
pub fn curves(series: &[(usize, String, Vec<f64>)]) -> Svg {
    let (w, h, left, top) = (560.0, 220.0, 56.0, 10.0);
    let mut svg = Svg::new(780.0, h + 50.0);
    let max_steps = series.iter().map(|c| c.2.len()).max().unwrap_or(1).max(2);
    let (lo, hi) = series
        .iter()
        .flat_map(|c| c.2.iter().copied())
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let yt = nice_ticks(lo, hi, 5);
    let (y0, y1) = (yt[0], *yt.last().unwrap_or(&yt[0]));
    let ys = |v: f64| top + h * (1.0 - (v - y0) / (y1 - y0).max(1e-300));
    let xs = |k: f64| left + w * k / (max_steps - 1) as f64;
    let yd = tick_digits(&yt);
    for &t in &yt {
        svg.line((left, ys(t)), (left + w, ys(t)), "#e4e4e4", false);
        svg.text(left - 6.0, ys(t) + 3.0, 10, "end", format!("{t:.yd$}"));
    }
    let xt = nice_ticks(1.0, max_steps as f64, 5);
    for &t in xt.iter().filter(|t| **t >= 1.0 && **t <= max_steps as f64) {
        svg.line(
            (xs(t - 1.0), top + h),
            (xs(t - 1.0), top + h + 4.0),
            "#444",
            false,
        );
        svg.text(xs(t - 1.0), top + h + 16.0, 10, "middle", format!("{t:.0}"));
    }
    svg.text(left + w, top + h + 30.0, 10, "end", "optimizer step");
    svg.line((left, top + h), (left + w, top + h), "#444", false);
    svg.line((left, top), (left, top + h), "#444", false);
    for (j, (i, label, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(k, v)| format!("{:.1},{:.1}", xs(k as f64), ys(*v)))
            .collect();
        svg.shapes.push(Shape::Polyline {
            points: points.join(" "),
            stroke: color(*i).into(),
            title: label.clone(),
        });
        let y = top + 12.0 + 16.0 * j as f64;
        svg.rect(left + w + 20.0, y - 4.0, 12.0, 3.0, color(*i), "");
        svg.text(left + w + 36.0, y, 11, "start", label.clone());
    }
    svg
}

/// A 20-bin histogram of the finite `values`, with the range and the
/// highest count labelled. None when no value is finite.
pub fn histogram(values: &[f64]) -> Option<Svg> {
    let v: Vec<f64> = values.iter().cloned().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
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
    let mut svg = Svg::new(460.0, 130.0);
    let left = 40.0;
    for (i, c) in counts.iter().enumerate() {
        let h = 100.0 * *c as f64 / maxc;
        svg.rect(
            left + 20.0 * i as f64,
            105.0 - h,
            18.0,
            h,
            "#bb7e4a",
            format!("{c} examples"),
        );
    }
    svg.text(left - 6.0, 9.0, 10, "end", format!("{maxc:.0}"));
    svg.text(left - 6.0, 105.0, 10, "end", "0");
    svg.text(left, 120.0, 10, "start", format!("{lo:.3}"));
    svg.text(
        left + 20.0 * bins as f64,
        120.0,
        10,
        "end",
        format!("{hi:.3}"),
    );
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = nice_ticks(9.45, 9.52, 5);
        assert!(t[0] <= 9.45 && *t.last().unwrap() >= 9.52, "{t:?}");
        assert!((t[1] - t[0] - 0.02).abs() < 1e-9 && t.len() <= 6, "{t:?}");
        let t = nice_ticks(-0.031, 0.012, 5);
        assert!(t[0] <= -0.031 && *t.last().unwrap() >= 0.012, "{t:?}");
        assert!(t.contains(&0.0), "{t:?}");
        // A single value still gets an axis around it.
        let t = nice_ticks(2.0, 2.0, 5);
        assert!(t[0] < 2.0 && *t.last().unwrap() > 2.0, "{t:?}");
    }

    fn circle_x(svg: &Svg) -> Vec<f64> {
        svg.shapes
            .iter()
            .filter_map(|s| match s {
                Shape::Circle { x, .. } => Some(*x),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn close_losses_are_drawn_apart_on_a_labelled_axis() {
        let rows = [
            Interval {
                label: "random",
                mean: 9.52,
                std: 0.0,
            },
            Interval {
                label: "tov",
                mean: 9.45,
                std: 0.01,
            },
        ];
        let svg = interval_plot(&rows, None, 4);
        let xs = circle_x(&svg);
        // 0.07 apart spans most of the 420-pixel axis (it was 0.7% of a
        // bar from zero).
        assert!(xs[0] - xs[1] > 250.0, "{xs:?}");
        let texts = svg.texts();
        assert!(
            texts.contains(&"9.46") && texts.contains(&"9.50"),
            "{texts:?}"
        );
        assert!(texts.contains(&"9.4500 ± 0.0100"), "{texts:?}");
    }

    #[test]
    fn differences_sit_on_either_side_of_the_zero_line() {
        let rows = [
            Interval {
                label: "random",
                mean: 0.0,
                std: 0.0,
            },
            Interval {
                label: "better",
                mean: -0.02,
                std: 0.005,
            },
            Interval {
                label: "worse",
                mean: 0.01,
                std: 0.0,
            },
        ];
        let svg = interval_plot(&rows, Some(0.0), 4);
        let zero = svg
            .shapes
            .iter()
            .find_map(|s| match s {
                Shape::Line { x1, dash: true, .. } => Some(*x1),
                _ => None,
            })
            .unwrap();
        let xs = circle_x(&svg);
        assert!((xs[0] - zero).abs() < 1e-9);
        assert!(xs[1] < zero && xs[2] > zero, "{xs:?} vs {zero}");
        // The whisker is ± one std around the mean: 2 × 0.005 on the axis.
        let ticks = nice_ticks(-0.025, 0.01, 5);
        let px = PLOT_WIDTH / (ticks.last().unwrap() - ticks[0]);
        let whisker = svg.shapes.iter().find_map(|s| match s {
            Shape::Line { x1, x2, y1, y2, .. }
                if y1 == y2 && (x2 - x1 - 0.01 * px).abs() < 1e-6 =>
            {
                Some(())
            }
            _ => None,
        });
        assert!(whisker.is_some(), "{:?}", svg.shapes);
    }

    #[test]
    fn length_shares_sum_to_one_and_bin_the_maximum_last() {
        let s = shares(&[0, 5, 10, 10], 10, 5);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(s[4], 0.5);
        assert_eq!(s[0], 0.25);
    }
}
