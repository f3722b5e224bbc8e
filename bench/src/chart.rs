//! The results chart: cost per scenario as a ratio to the bare drop, and the scaling curves.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;

use crate::cost::{Cost, ScalePoint};

/// Debian's DejaVu Sans (package fonts-dejavu-core), registered for the chart's text.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    let bytes =
        std::fs::read(FONT).with_context(|| format!("{FONT} (install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    Ok(())
}

/// Draws the chart to `path` (PNG).
pub fn draw(
    path: &Path,
    baselines: &[Cost],
    scenarios: &[Cost],
    scaling: &[ScalePoint],
) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(520);

    let bars: Vec<&Cost> = baselines.iter().chain(scenarios).collect();
    let max = bars.iter().map(|c| c.ratio).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Cost per packet, as a ratio to a bare XDP_DROP program",
            ("sans-serif", 24),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, 0..bars.len())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|i| bars.get(*i).map_or(String::new(), |c| c.name.clone()))
        .x_desc("× bare XDP_DROP")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, c)| {
            let color = if c.verdict.starts_with("drop") {
                RED.mix(0.6)
            } else {
                BLUE.mix(0.6)
            };
            Rectangle::new([(0.0, i), (c.ratio, i + 1)], color.filled())
        }))
        .map_err(|e| anyhow!("{e}"))?;

    let curves: Vec<String> = {
        let mut names: Vec<String> = scaling.iter().map(|p| p.curve.clone()).collect();
        names.dedup();
        names
    };
    let max_ratio = scaling.iter().map(|p| p.ratio).fold(1.0, f64::max) * 1.2;
    let max_size = scaling.iter().map(|p| p.size).max().unwrap_or(10) as f64;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "Scaling: cost relative to the smallest size",
            ("sans-serif", 24),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0..max_size * 2.0).log_scale(), 0.0..max_ratio)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("tracked sources / list prefixes")
        .y_desc("ratio")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, curve) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = scaling
            .iter()
            .filter(|p| &p.curve == curve)
            .map(|p| (p.size as f64, p.ratio))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(3)))
            .map_err(|e| anyhow!("{e}"))?
            .label(curve.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
