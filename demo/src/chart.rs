//! `timeline.png`: the attack's packets offered, dropped and answered by the SYN-cookie
//! challenge per second above, with a bar for each attack the daemon recorded (from its
//! start to its end); the legitimate clients' success rate and p99 latency below,
//! with a mark for each brand-new client that connected (or failed to) during the attack;
//! the phase boundaries marked on both.
//!
//! Text is drawn with a TrueType font read from the usual system locations (plotters'
//! pure-Rust `ab_glyph` renderer, no C libraries). Without one the chart is still drawn, only
//! without its labels.

use std::{fs, path::Path, sync::OnceLock};

use anyhow::{Result, anyhow};
use plotters::{
    coord::Shift,
    prelude::*,
    style::{
        FontStyle, register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};

use crate::{
    clients::{NewcomerRecord, Outcome},
    phases::LimiterState,
    report::{Report, SecondSummary},
};

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 900;
const FONT_FAMILY: &str = "sans-serif";
const FONT_CANDIDATES: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

const OFFERED: RGBColor = RGBColor(214, 39, 40);
const DROPPED: RGBColor = RGBColor(31, 119, 180);
const WOULD_DROP: RGBColor = RGBColor(255, 127, 14);
const SUCCESS: RGBColor = RGBColor(44, 160, 44);
const LATENCY: RGBColor = RGBColor(148, 103, 189);
const CHALLENGED: RGBColor = RGBColor(23, 190, 207);
const NEWCOMER_OK: RGBColor = RGBColor(0, 100, 0);
const NEWCOMER_FAILED: RGBColor = RGBColor(214, 39, 40);
const ATTACK_RECORD: RGBColor = RGBColor(90, 90, 90);

/// A per-second value to plot, if there is one for that second.
type Value = fn(&SecondSummary) -> Option<f64>;

/// Bottom of the logarithmic latency axis.
const LATENCY_FLOOR_MS: f64 = 0.1;

/// Registers the first font found; true when text can be drawn.
fn text_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        FONT_CANDIDATES.iter().any(|path| {
            let Ok(bytes) = fs::read(path) else {
                return false;
            };
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// Draws the timeline of `report` into `path` (PNG).
pub fn draw(path: &Path, report: &Report) -> Result<()> {
    draw_with(path, report, text_available())
}

fn draw_with(path: &Path, report: &Report, with_text: bool) -> Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = if with_text {
        root.titled(
            "limiter demo: a multi-vector flood against an exchange API host",
            (FONT_FAMILY, 24),
        )
        .map_err(plot_error)?
    } else {
        root
    };
    let (upper, lower) = root.split_vertically(HEIGHT * 45 / 100);
    let x_end = report
        .seconds
        .last()
        .map_or(1.0, |s| s.end_s.ceil())
        .max(1.0);
    let boundaries: Vec<(f64, String)> = report
        .phases
        .iter()
        .map(|p| (p.start_s, format!("{} {}", p.spec.id, p.spec.short)))
        .collect();
    draw_attack(&upper, report, x_end, &boundaries, with_text)?;
    draw_legit(&lower, report, x_end, &boundaries, with_text)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("draw the chart: {e}")
}

/// Points of `value` at the middle of each second, one run per phase so that the lines do
/// not bridge the pauses between phases.
fn runs(
    seconds: &[SecondSummary],
    value: impl Fn(&SecondSummary) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current_phase = None;
    for second in seconds {
        if current_phase != Some(second.phase) {
            runs.push(Vec::new());
            current_phase = Some(second.phase);
        }
        if let (Some(run), Some(y)) = (runs.last_mut(), value(second)) {
            run.push(((second.start_s + second.end_s) / 2.0, y));
        }
    }
    runs
}

fn draw_attack(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    report: &Report,
    x_end: f64,
    boundaries: &[(f64, String)],
    with_text: bool,
) -> Result<()> {
    let peak = report
        .seconds
        .iter()
        .map(|s| {
            s.attack_offered_pps
                .max(s.dropped_pps)
                .max(s.would_drop_pps)
        })
        .fold(0.0, f64::max);
    let y_end = (peak / 1000.0 * 1.15).max(1.0);
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if with_text {
        builder
            .caption(
                "attack traffic at the edge (thousand packets per second)",
                (FONT_FAMILY, 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(60)
            // As wide as the lower chart's latency axis, so the two time axes line up.
            .right_y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..x_end, 0.0..y_end)
        .map_err(plot_error)?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.y_desc("k pps").label_style((FONT_FAMILY, 13));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plot_error)?;
    draw_boundaries(&mut chart, boundaries, y_end, with_text)?;

    let series: [(&str, RGBColor, Value); 4] = [
        ("offered by the attacker", OFFERED, |s| {
            Some(s.attack_offered_pps / 1000.0)
        }),
        // Drawn only where they can be non-zero: dropped once the limiter is attached,
        // would-drop in monitor mode.
        ("dropped by the limiter", DROPPED, |s| {
            (s.limiter != LimiterState::Off).then_some(s.dropped_pps / 1000.0)
        }),
        ("would-drop (monitor mode)", WOULD_DROP, |s| {
            (s.limiter == LimiterState::Monitor).then_some(s.would_drop_pps / 1000.0)
        }),
        (
            "SYN-cookie challenges sent (attack mode)",
            CHALLENGED,
            |s| (s.limiter == LimiterState::Enforce).then_some(s.challenged_pps / 1000.0),
        ),
    ];
    for (label, color, value) in series {
        for (i, run) in runs(&report.seconds, value).into_iter().enumerate() {
            let drawn = chart
                .draw_series(LineSeries::new(run, color.stroke_width(3)))
                .map_err(plot_error)?;
            if i == 0 && with_text {
                drawn.label(label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            }
        }
    }
    // The attacks the daemon recorded: one bar each, from its start to its end (or the end of
    // the run), stacked down from the middle (clear of the flood's lines above and the
    // challenge's below), labelled with its id, type and prefix.
    for (i, attack) in report.attacks.iter().enumerate() {
        let y = y_end * (0.56 - 0.06 * i as f64);
        let end = attack.end_s.unwrap_or(x_end).min(x_end);
        let drawn = chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(attack.start_s.max(0.0), y), (end, y)],
                ATTACK_RECORD.stroke_width(5),
            )))
            .map_err(plot_error)?;
        if with_text {
            if i == 0 {
                drawn
                    .label("attack records (limiter attacks)")
                    .legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], ATTACK_RECORD.stroke_width(5))
                    });
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("#{} {} {}", attack.id, attack.kind, attack.prefix),
                    (end + x_end * 0.005, y),
                    (FONT_FAMILY, 12)
                        .into_font()
                        .color(&ATTACK_RECORD)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )))
                .map_err(plot_error)?;
        }
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 14))
            .draw()
            .map_err(plot_error)?;
    }
    Ok(())
}

fn draw_legit(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    report: &Report,
    x_end: f64,
    boundaries: &[(f64, String)],
    with_text: bool,
) -> Result<()> {
    let p99_peak = report
        .seconds
        .iter()
        .filter_map(|s| s.legit.p99_ms)
        .fold(0.0, f64::max);
    // Logarithmic: a few milliseconds under attack and the partner's retransmission delays
    // of hundreds of milliseconds both stay readable.
    let latency_end = (p99_peak * 2.0).max(10.0);
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if with_text {
        builder
            .caption(
                "legitimate clients: success rate and p99 latency, per second",
                (FONT_FAMILY, 18),
            )
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..x_end, 0.0..105.0)
        .map_err(plot_error)?
        .set_secondary_coord(0.0..x_end, (LATENCY_FLOOR_MS..latency_end).log_scale());
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc("seconds since the start")
            .y_desc("success %")
            .label_style((FONT_FAMILY, 13));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plot_error)?;
    if with_text {
        chart
            .configure_secondary_axes()
            .y_desc("p99 latency (ms, log scale)")
            .label_style((FONT_FAMILY, 13))
            .draw()
            .map_err(plot_error)?;
    }
    draw_boundaries(&mut chart, boundaries, 105.0, with_text)?;

    for (i, run) in runs(&report.seconds, |s| s.legit.success_pct)
        .into_iter()
        .enumerate()
    {
        let drawn = chart
            .draw_series(LineSeries::new(run, SUCCESS.stroke_width(3)))
            .map_err(plot_error)?;
        if i == 0 && with_text {
            drawn.label("success %").legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], SUCCESS.stroke_width(3))
            });
        }
    }
    for (i, run) in runs(&report.seconds, |s| {
        s.legit.p99_ms.map(|ms| ms.max(LATENCY_FLOOR_MS))
    })
    .into_iter()
    .enumerate()
    {
        let drawn = chart
            .draw_secondary_series(LineSeries::new(run, LATENCY.stroke_width(2)))
            .map_err(plot_error)?;
        if i == 0 && with_text {
            drawn.label("p99 latency (right axis)").legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], LATENCY.stroke_width(2))
            });
        }
    }
    draw_newcomers(&mut chart, report, with_text)?;
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 14))
            .draw()
            .map_err(plot_error)?;
    }
    Ok(())
}

/// A mark for each brand-new client's first request, at the time it was sent: a triangle at
/// the top when it was answered, a cross at the bottom when it was not.
fn draw_newcomers<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    report: &Report,
    with_text: bool,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let (connected, failed): (Vec<&NewcomerRecord>, Vec<&NewcomerRecord>) = report
        .newcomers
        .iter()
        .partition(|n| n.outcome == Outcome::Ok);
    let drawn = chart
        .draw_series(
            connected
                .iter()
                .map(|n| TriangleMarker::new((n.started, 101.0), 7, NEWCOMER_OK.filled())),
        )
        .map_err(plot_error)?;
    if with_text {
        drawn
            .label("a brand-new client connected")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, NEWCOMER_OK.filled()));
    }
    let drawn = chart
        .draw_series(
            failed
                .iter()
                .map(|n| Cross::new((n.started, 3.0), 7, NEWCOMER_FAILED.stroke_width(3))),
        )
        .map_err(plot_error)?;
    if with_text {
        drawn
            .label("a brand-new client failed")
            .legend(|(x, y)| Cross::new((x + 10, y), 6, NEWCOMER_FAILED.stroke_width(3)));
    }
    Ok(())
}

/// A vertical line at the start of each phase, with the phase's number.
fn draw_boundaries<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    boundaries: &[(f64, String)],
    y_end: f64,
    with_text: bool,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (x, label) in boundaries {
        let x = *x;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_end)],
                BLACK.mix(0.35).stroke_width(1),
            )))
            .map_err(plot_error)?;
        if with_text {
            chart
                .draw_series(std::iter::once(Text::new(
                    label.clone(),
                    (x, y_end),
                    (FONT_FAMILY, 14).into_font().color(&BLACK.mix(0.7)),
                )))
                .map_err(plot_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attacks::AttackPlan,
        report::{LegitSummary, Settings},
    };

    fn report() -> Report {
        let seconds = (0..6)
            .map(|i| SecondSummary {
                phase: if i < 3 { "1" } else { "2" },
                limiter: LimiterState::Off,
                start_s: f64::from(i) + if i >= 3 { 0.5 } else { 0.0 },
                end_s: f64::from(i + 1) + if i >= 3 { 0.5 } else { 0.0 },
                attack_offered_pps: if i >= 3 { 30_000.0 } else { 0.0 },
                dropped_pps: if i >= 4 { 29_000.0 } else { 0.0 },
                would_drop_pps: 0.0,
                challenged_pps: if i >= 4 { 500.0 } else { 0.0 },
                challenge_engaged: i >= 4,
                legit: LegitSummary {
                    requests: 20,
                    ok: 20,
                    success_pct: Some(100.0),
                    p50_ms: Some(1.0),
                    p99_ms: Some(3.0 + f64::from(i)),
                },
            })
            .collect();
        Report {
            settings: Settings {
                phase_seconds: 3,
                attack: AttackPlan {
                    flood_pps: 10_000,
                    http_requests_per_second: 1000,
                },
                legit_requests_per_second_each: 5,
                request_timeout_ms: 1000,
                clients: &crate::clients::CLIENTS,
                limiter_config: String::new(),
            },
            phases: Vec::new(),
            seconds,
            newcomers: [
                (3.8, Outcome::Ok),
                (4.8, Outcome::Ok),
                (5.8, Outcome::Timeout),
            ]
            .map(|(started, outcome)| NewcomerRecord {
                source: std::net::Ipv4Addr::new(10, 77, 1, 100),
                started,
                ended: started + 0.01,
                outcome,
            })
            .to_vec(),
            expectations: Vec::new(),
            passed: true,
            top_sources: String::new(),
            nonzero_packet_counters: Vec::new(),
            attacks: vec![crate::report::AttackRow {
                id: 1,
                kind: "syn_flood".to_owned(),
                prefix: "10.78.0.0/16".to_owned(),
                start_s: 4.5,
                end_s: None,
                peak_packets_per_second: 29_000,
                dropped_packets: 50_000,
            }],
            attacks_table: String::new(),
        }
    }

    fn png_is_written(with_text: bool) {
        let dir = std::env::temp_dir().join(format!(
            "limiter-demo-chart-{}-{with_text}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("timeline.png");
        draw_with(&path, &report(), with_text).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn draws_without_a_font() {
        png_is_written(false);
    }

    #[test]
    fn draws_with_a_font_when_one_is_installed() {
        if text_available() {
            png_is_written(true);
        }
    }
}
