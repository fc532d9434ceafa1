//! The bench's figures as SVG line charts (plotters' SVG backend: text stays `<text>`, so no
//! font library is needed).

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend.
    pub name: String,
    /// Its points, in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// A chart's title and axes.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// Logarithmic x axis.
    pub x_log: bool,
    /// Logarithmic y axis.
    pub y_log: bool,
}

/// The distribution of `latencies` (any unit) as a CDF: (latency, fraction of requests at or
/// under it), at most 400 points.
pub fn cdf(latencies: &[u64]) -> Vec<(f64, f64)> {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(400);
    let mut points: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted[i] as f64, (i + 1) as f64 / n as f64))
        .collect();
    points.push((sorted[n - 1] as f64, 1.0));
    points
}

/// The smallest range holding every point's coordinate `f`, widened a little; for a log
/// axis, positive values only.
fn bounds(series: &[Series], f: fn(&(f64, f64)) -> f64, log: bool) -> Result<Range<f64>> {
    let values = series
        .iter()
        .flat_map(|s| s.points.iter().map(f))
        .filter(|v| v.is_finite() && (!log || *v > 0.0));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    anyhow::ensure!(lo.is_finite(), "nothing to draw");
    Ok(if log {
        lo / 1.2..hi * 1.2
    } else {
        // Linear axes start at zero for positive data (ratios and sizes read from zero).
        let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.01).max(1e-9);
        if lo >= 0.0 {
            0.0..hi + pad
        } else {
            lo - pad..hi + pad
        }
    })
}

/// Draws `series` into the SVG file `path`.
pub fn lines(path: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    let x = bounds(series, |p| p.0, chart.x_log)?;
    let y = bounds(series, |p| p.1, chart.y_log)?;
    match (chart.x_log, chart.y_log) {
        (false, false) => draw(path, chart, series, x, y),
        (true, false) => draw(path, chart, series, x.log_scale(), y),
        (false, true) => draw(path, chart, series, x, y.log_scale()),
        (true, true) => draw(path, chart, series, x.log_scale(), y.log_scale()),
    }
}

fn draw<X, Y>(path: &Path, chart: &Chart, series: &[Series], x: X, y: Y) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(&e))?;
    plot.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        plot.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(&s.name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    plot.configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_an_svg_with_its_title_legend_and_lines() {
        let dir = std::env::temp_dir().join(format!("pia-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cdf.svg");
        let fast: Vec<u64> = (1..=1000).collect();
        let slow: Vec<u64> = (1..=1000).map(|v| v * 10).collect();
        lines(
            &file,
            &Chart {
                title: "latency".into(),
                x_label: "µs".into(),
                y_label: "fraction".into(),
                x_log: true,
                y_log: false,
            },
            &[
                Series {
                    name: "fast".into(),
                    points: cdf(&fast),
                },
                Series {
                    name: "slow".into(),
                    points: cdf(&slow),
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for text in ["latency", "fast", "slow", "µs", "fraction"] {
            // plotters writes each text on a line of its own inside its element.
            assert!(
                svg.contains(&format!(">\n{text}\n</text>")),
                "{text} missing"
            );
        }
        assert!(svg.matches("<polyline").count() >= 2, "{svg}");
        let points = cdf(&fast);
        assert!(points.len() <= 402);
        assert_eq!(points.last(), Some(&(1000.0, 1.0)));
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
