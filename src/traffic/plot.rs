//! The load generator's plot (`pingate-load run --svg FILE`): latency percentiles and throughput second by second,
//! drawn with `plotters` on its SVG backend (axes, ticks, a legend, a log scale for latency; the same code could
//! draw PNG with plotters' bitmap backend). Latency spans orders of magnitude within one run (a p50 of 0.5 ms
//! beside a max of 200 ms during a stall), so its axis is logarithmic: on a linear one the percentiles of a good
//! second would all sit on the floor.

use plotters::prelude::*;

use crate::traffic::load::{LoadReport, Second};

/// Size of the picture, in pixels.
const SIZE: (u32, u32) = (960, 480);

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing the plot: {0}")]
    Draw(String),
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// The percentiles drawn, each a line: (quantile, legend, colour).
const LINES: [(f64, &str, RGBColor); 4] = [
    (0.5, "p50 latency", RGBColor(0x22, 0xaa, 0x77)),
    (0.9, "p90 latency", RGBColor(0xdd, 0x99, 0x22)),
    (0.99, "p99 latency", RGBColor(0xcc, 0x33, 0x33)),
    (1.0, "max latency", RGBColor(0x88, 0x22, 0x88)),
];
const THROUGHPUT: RGBColor = RGBColor(0x4a, 0x7c, 0xb0);

/// Latency of second `s` at quantile `q`, in milliseconds; `None` for a second without answers (a log scale has no
/// zero, and a gap says "nothing came back" better than a dip would).
fn ms(s: &Second, q: f64) -> Option<f64> {
    (!s.latency.is_empty()).then(|| s.latency.value_at_quantile(q) as f64 / 1e3)
}

/// The SVG document: latency percentiles (left axis, ms, log scale) and answers per second (right axis) against the
/// seconds of the run, under `title`.
pub fn load_svg(title: &str, r: &LoadReport) -> Result<String, PlotError> {
    let n = r.seconds.len().max(1) as f64;
    let all = || {
        r.seconds
            .iter()
            .flat_map(|s| LINES.iter().filter_map(move |(q, ..)| ms(s, *q)))
    };
    // A decade's margin is not needed: a fifth below the lowest value and half above the highest keep the lines off
    // the frame.
    let lo = all().fold(f64::INFINITY, f64::min);
    let hi = all().fold(0.0, f64::max);
    // Room above the lines for the legend: a third of the height on both axes.
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        ((lo * 0.8).max(0.001), (hi * 1.25).max(lo * 2.0))
    } else {
        (0.01, 10.0)
    };
    let hi = hi * (hi / lo).powf(0.5);
    let max_rate = r.seconds.iter().map(|s| s.answered as f64).fold(1.0, f64::max) * 1.5;
    // Ticks: whole seconds (at most about 12), and 1-2-5 steps of each decade of latency (a log axis labels only
    // the powers of ten by itself, often a single one within a run).
    // Asked for at most one label per second, plotters' steps (1, 2, 5, 10, ...) fall on whole seconds.
    let seconds = (n as usize).min(12) + 1;
    let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
    let latencies: Vec<f64> = decades
        .flat_map(|d| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(d)))
        .filter(|v| (lo..=hi).contains(v))
        .collect();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0f64..n, (lo..hi).log_scale().with_key_points(latencies))
            .map_err(draw_err)?
            .set_secondary_coord(0f64..n, 0f64..max_rate);
        chart
            .configure_mesh()
            .x_desc("seconds into the run")
            .y_desc("latency, ms (log scale)")
            .x_labels(seconds)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{}", (v * 1e3).round() / 1e3))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_err)?;
        chart
            .configure_secondary_axes()
            .y_desc("answers per second")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(draw_err)?;
        // Throughput first, as a shaded area under the latency lines.
        let rate = r
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64 + 0.5, s.answered as f64));
        chart
            .draw_secondary_series(AreaSeries::new(rate, 0.0, THROUGHPUT.mix(0.2)).border_style(THROUGHPUT))
            .map_err(draw_err)?
            .label("answers per second")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], THROUGHPUT.mix(0.4).filled()));
        for (q, name, colour) in LINES {
            // One line per stretch of seconds with answers: a silent second is a gap, not a line across it.
            let mut stretches: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for (i, s) in r.seconds.iter().enumerate() {
                match ms(s, q) {
                    Some(v) => stretches.last_mut().expect("one at least").push((i as f64 + 0.5, v)),
                    None => stretches.push(Vec::new()),
                }
            }
            for (k, points) in stretches.into_iter().filter(|p| !p.is_empty()).enumerate() {
                let series = chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                    .map_err(draw_err)?;
                if k == 0 {
                    series
                        .label(name)
                        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::load::histogram;

    /// A run of `secs` seconds whose second `i` answered `rate(i)` requests taking `lat(i)` µs each.
    fn run(secs: usize, rate: impl Fn(usize) -> u64, lat: impl Fn(usize) -> u64) -> LoadReport {
        let mut r = LoadReport::default();
        for i in 0..secs {
            let mut latency = histogram();
            for k in 0..rate(i) {
                // A spread, so the percentiles differ.
                latency.record(lat(i) + k % 7 * lat(i) / 3).unwrap();
            }
            r.seconds.push(Second {
                answered: rate(i),
                latency,
            });
        }
        r
    }

    /// Every tag opened is closed, in order: the document is well-formed enough for a browser's XML parser.
    fn balanced(svg: &str) -> Result<(), String> {
        let mut open: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let end = rest[i..].find('>').ok_or("a tag is not closed")? + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            let name = tag
                .trim_start_matches('/')
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            if tag.starts_with('/') {
                match open.pop() {
                    Some(o) if o == name => {}
                    o => return Err(format!("</{name}> closes {o:?}")),
                }
            } else {
                open.push(name);
            }
        }
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!("left open: {open:?}"))
        }
    }

    #[test]
    fn load_plot_is_an_svg_with_axes_series_and_legend() {
        let r = run(20, |i| 1000 + i as u64 * 10, |i| 500 + i as u64 * 20);
        let svg = load_svg("pingate-load: 10 connections", &r).unwrap();
        let body = svg.trim_start_matches(|c| c != '<');
        assert!(
            body.starts_with("<svg") || body.starts_with("<?xml"),
            "{}",
            &svg[..80.min(svg.len())]
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        balanced(&svg).unwrap();
        for text in [
            "pingate-load: 10 connections",
            "seconds into the run",
            "latency, ms (log scale)",
            "answers per second",
            "p50 latency",
            "p90 latency",
            "p99 latency",
            "max latency",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // The four latency lines and the throughput's outline.
        assert!(svg.matches("<polyline").count() >= 5, "{svg}");
    }

    #[test]
    fn load_plot_changes_with_the_data() {
        let a = load_svg("t", &run(10, |_| 1000, |_| 500)).unwrap();
        let b = load_svg("t", &run(10, |_| 1000, |_| 5000)).unwrap();
        let c = load_svg("t", &run(10, |i| 500 + i as u64 * 100, |_| 500)).unwrap();
        let d = load_svg("t", &run(30, |_| 1000, |_| 500)).unwrap();
        assert_ne!(a, b, "latency ten times higher");
        assert_ne!(a, c, "another throughput");
        assert_ne!(a, d, "a longer run");
        // And the same data draws the same picture.
        assert_eq!(a, load_svg("t", &run(10, |_| 1000, |_| 500)).unwrap());
    }

    #[test]
    fn load_plot_of_a_run_without_answers_or_with_silent_seconds() {
        // Nothing answered at all: still a picture, with its axes.
        let empty = load_svg("nothing", &LoadReport::default()).unwrap();
        balanced(&empty).unwrap();
        assert!(empty.contains("answers per second"));
        // A second without answers leaves a gap in the latency lines, not a zero on a log scale.
        let gap = load_svg("gap", &run(6, |i| if i == 3 { 0 } else { 100 }, |_| 800)).unwrap();
        balanced(&gap).unwrap();
        let whole = load_svg("gap", &run(6, |_| 100, |_| 800)).unwrap();
        assert_eq!(
            gap.matches("<polyline").count(),
            whole.matches("<polyline").count() + LINES.len(),
            "each latency line broken in two"
        );
    }
}
