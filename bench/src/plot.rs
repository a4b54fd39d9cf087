//! The writer-wait CDF figure: one panel per journal mode × process count,
//! one line per mode, log-scale wait axis. SVG via plotters.

use std::path::Path;

use plotters::prelude::*;

use crate::common::Mode;

/// One panel: a title and, per mode, the ascending waits in milliseconds.
pub struct Panel {
    pub title: String,
    pub lines: Vec<(Mode, Vec<f64>)>,
}

fn color(m: Mode) -> RGBColor {
    match m {
        Mode::Stock => RGBColor(214, 39, 40),     // red
        Mode::AppFlock => RGBColor(31, 119, 180), // blue
        Mode::Writelock => RGBColor(44, 160, 44), // green
    }
}

/// The y axis is the CDF on a "nines" scale, y = -log10(1 - F), so the body
/// (F = 0 … 0.9 in y = 0 … 1) and the tail (0.99, 0.999, … one unit each)
/// are both readable: the targets are about p99 and max.
fn nines(f: f64) -> f64 {
    -(1.0 - f).log10()
}

/// The empirical CDF of `sorted` as (wait, nines(F)) with F = i/(n+1)
/// (so the last sample, the maximum, sits at a finite height), thinned to
/// about `max` points in the body; every point of the last 1% is kept.
fn cdf_points(sorted: &[f64], lo: f64, max: usize) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(max).max(1);
    let tail = n - n.div_ceil(100);
    let mut pts: Vec<(f64, f64)> = Vec::new();
    for (i, &v) in sorted.iter().enumerate() {
        if i % step == 0 || i >= tail {
            let x = v.max(lo);
            let y = nines((i + 1) as f64 / (n + 1) as f64);
            // A step: along at the previous height, then up.
            if let Some(&(_, prev)) = pts.last() {
                pts.push((x, prev));
            }
            pts.push((x, y));
        }
    }
    pts
}

fn fmt_frac(y: f64) -> String {
    if y < 0.05 {
        return "0".into();
    }
    let f = 1.0 - 10f64.powf(-y);
    let digits = (y.round() as usize).max(1);
    format!("{f:.digits$}")
}

fn fmt_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// Draw `panels` in a grid of `cols` columns (rows follow) to `path`.
pub fn draw(path: &Path, title: &str, panels: &[Panel], cols: usize) -> Result<(), String> {
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let (pw, ph) = (440u32, 330u32);
    let header = 96u32;
    let size = (pw * cols as u32, header + ph * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (top, body) = root.split_vertically(header);

    // Title and one shared legend.
    top.draw(&Text::new(
        title.to_string(),
        (16, 12),
        ("sans-serif", 20).into_font().color(&BLACK),
    ))
    .map_err(e)?;
    top.draw(&Text::new(
        "y: fraction of waits ≤ x on a nines scale (0.9, 0.99, 0.999 evenly spaced; the top of a line is its maximum wait); x: wait in ms, log scale".to_string(),
        (16, 40),
        ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80)),
    ))
    .map_err(e)?;
    let mut x = 16;
    for m in Mode::ALL {
        let y = 76;
        top.draw(&PathElement::new(
            vec![(x, y), (x + 36, y)],
            color(m).stroke_width(3),
        ))
        .map_err(e)?;
        top.draw(&Text::new(
            m.name().to_string(),
            (x + 44, y - 8),
            ("sans-serif", 16).into_font().color(&BLACK),
        ))
        .map_err(e)?;
        x += 170;
    }

    // One x range for every panel, so panels compare at a glance.
    let all = panels
        .iter()
        .flat_map(|p| p.lines.iter().flat_map(|(_, v)| v.last().copied()));
    let hi_data = all.fold(1.0f64, f64::max);
    let lo = 0.001f64; // 1 µs: anything faster is drawn at the left edge
    let hi = 10f64.powf(hi_data.log10().ceil()).max(1.0);
    let decades = (hi / lo).log10().round() as usize;
    let most = panels
        .iter()
        .flat_map(|p| p.lines.iter().map(|(_, v)| v.len()))
        .max()
        .unwrap_or(1);
    let y_hi = ((most + 1) as f64).log10().ceil().max(2.0);

    for (area, p) in body.split_evenly((rows, cols)).iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 17))
            .margin(10)
            .margin_right(18)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..y_hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_labels(decades)
            .y_labels(y_hi as usize + 1)
            .x_label_formatter(&|v| fmt_ms(*v))
            .y_label_formatter(&|v| fmt_frac(*v))
            .x_desc("writer wait (ms, log scale)")
            .y_desc("fraction of waits ≤ x")
            .y_max_light_lines(1)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 13))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(e)?;
        for (m, v) in &p.lines {
            chart
                .draw_series(LineSeries::new(
                    cdf_points(v, lo, 1500),
                    color(*m).stroke_width(2),
                ))
                .map_err(e)?;
        }
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
