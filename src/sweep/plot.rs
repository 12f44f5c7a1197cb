//! Pictures of a sweep: the metric against σ_rel (one line per training time, error bars of
//! ± one standard deviation over seed sets, or KID's standard error with one set, the best
//! point ringed), and for 2-D sweeps a heat map over (σ_rel, training time).

use plotters::prelude::*;

use super::results::PointResult;
use crate::db::{PointRow, SweepRow};
use crate::error::{Error, Result};

/// A finished point's value of one metric as displayed (× the metric's display scale): mean
/// and the half-height of its error bar ([`super::error_bar`]).
fn value(p: &PointRow, metric: &str, scale: f64) -> Option<(f64, f64)> {
    let r: PointResult = serde_json::from_value(p.result.clone()?).ok()?;
    let m = r.named(metric)?;
    let bar = super::error_bar(m).unwrap_or(0.0);
    Some((m.mean * scale, bar * scale))
}

/// The best of `values` (lowest, or highest when `lower` is false).
fn best_of<'a, 'b>(
    values: &'b [(&'a PointRow, f64, f64)],
    lower: bool,
) -> &'b (&'a PointRow, f64, f64) {
    values
        .iter()
        .reduce(|a, b| {
            let better = if lower { b.1 < a.1 } else { b.1 > a.1 };
            if better {
                b
            } else {
                a
            }
        })
        .expect("not empty")
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(err: DrawingAreaErrorKind<E>) -> Error {
    Error::invalid("plot", format!("drawing failed: {err}"))
}

/// Colours of successive training times.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The metric named `metric` (`fid`, `kid`, a user metric's) against σ_rel for every
/// training time of the sweep, as an SVG document; a 2-D sweep (several training times) gets
/// a heat map beside the curves. The best point (by the metric's direction) is ringed.
/// Errors when the sweep has no such metric or no point has a value yet.
pub fn sweep_svg(sweep: &SweepRow, points: &[PointRow], metric: &str) -> Result<String> {
    // Names, scale and direction as every other display shows them (KID ×10³).
    let info = match super::spec_of(sweep) {
        Ok(spec) => spec.metric_named(metric).ok_or_else(|| {
            Error::invalid(
                "metric",
                format!(
                    "sweep {} has no metric {metric:?} (its metrics: {})",
                    sweep.id,
                    spec.metric_infos()
                        .iter()
                        .map(|m| m.metric.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?,
        Err(_) => match metric.parse() {
            Ok(m) => super::MetricInfo::new(m, false),
            Err(e) => return Err(e),
        },
    };
    let values: Vec<(&PointRow, f64, f64)> = points
        .iter()
        .filter_map(|p| value(p, metric, info.scale).map(|(v, e)| (p, v, e)))
        .filter(|(_, v, _)| v.is_finite())
        .collect();
    if values.is_empty() {
        return Err(Error::invalid(
            "sweep",
            format!("no finished point has {metric} yet"),
        ));
    }
    let lower = info.lower_is_better;
    let mut nimgs: Vec<i64> = points.iter().map(|p| p.nimg).collect();
    nimgs.sort_unstable();
    nimgs.dedup();
    let two_d = nimgs.len() > 1;
    let (w, h) = if two_d { (1100u32, 440u32) } else { (640, 440) };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let name = info.axis_label.clone();
        let title = format!(
            "{name} vs EMA length — run {}, sweep {} ({} of {} points)",
            sweep.run,
            sweep.id,
            values.len(),
            points.len()
        );
        let (header, body) = root.split_vertically(32);
        header
            .titled(&title, ("sans-serif", 17))
            .map_err(draw_error)?;
        if two_d {
            let (left, right) = body.split_horizontally(600);
            curves(&left, &values, &nimgs, &name, lower)?;
            heat_map(&right, &values, &nimgs, &name, lower)?;
        } else {
            curves(&body, &values, &nimgs, &name, lower)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn curves<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    values: &[(&PointRow, f64, f64)],
    nimgs: &[i64],
    name: &str,
    lower: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = values.iter().map(|v| v.0.sigma_rel);
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let pad_x = ((x_hi - x_lo) * 0.06).max(0.005);
    let (y_lo, y_hi) = values.iter().fold((f64::MAX, f64::MIN), |(a, b), v| {
        (a.min(v.1 - v.2), b.max(v.1 + v.2))
    });
    let pad_y = ((y_hi - y_lo) * 0.1).max(y_hi.abs() * 0.02).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x_lo - pad_x)..(x_hi + pad_x),
            (y_lo - pad_y)..(y_hi + pad_y),
        )
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("sigma_rel (EMA length)")
        .y_desc(name)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()
        .map_err(draw_error)?;
    for (k, &nimg) in nimgs.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let mut line: Vec<(f64, f64, f64)> = values
            .iter()
            .filter(|v| v.0.nimg == nimg)
            .map(|v| (v.0.sigma_rel, v.1, v.2))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let series = chart
            .draw_series(LineSeries::new(
                line.iter().map(|p| (p.0, p.1)),
                colour.stroke_width(2),
            ))
            .map_err(draw_error)?;
        if nimgs.len() > 1 {
            series
                .label(format!("nimg {}", nimg))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
        }
        chart
            .draw_series(
                line.iter()
                    .map(|&(x, y, _)| Circle::new((x, y), 3, colour.filled())),
            )
            .map_err(draw_error)?;
        chart
            .draw_series(line.iter().filter(|p| p.2 > 0.0).map(|&(x, y, e)| {
                ErrorBar::new_vertical(x, y - e, y, y + e, colour.stroke_width(1), 6)
            }))
            .map_err(draw_error)?;
    }
    let best = best_of(values, lower);
    chart
        .draw_series([Circle::new(
            (best.0.sigma_rel, best.1),
            8,
            BLACK.stroke_width(2),
        )])
        .map_err(draw_error)?;
    chart
        .draw_series([Text::new(
            format!("best σ_rel {:.3}: {:.3}", best.0.sigma_rel, best.1),
            (best.0.sigma_rel, best.1 + best.2 + pad_y * 0.4),
            ("sans-serif", 12),
        )])
        .map_err(draw_error)?;
    if nimgs.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(draw_error)?;
    }
    Ok(())
}

/// Viridis-like ramp from dark blue (low = good) to yellow (high).
fn ramp(t: f64) -> RGBColor {
    let stops = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (stops.len() - 1) as f64;
    let i = (t.floor() as usize).min(stops.len() - 2);
    let f = t - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn heat_map<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    values: &[(&PointRow, f64, f64)],
    nimgs: &[i64],
    name: &str,
    lower: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut sigmas: Vec<f64> = values.iter().map(|v| v.0.sigma_rel).collect();
    sigmas.sort_by(f64::total_cmp);
    sigmas.dedup();
    let (lo, hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v.1), b.max(v.1)));
    let span = (hi - lo).max(1e-12);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{name} over (sigma_rel, nimg): dark is better"),
            ("sans-serif", 13),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0..sigmas.len() as i32, 0..nimgs.len() as i32)
        .map_err(draw_error)?;
    let sig_labels = sigmas.clone();
    let nimg_labels = nimgs.to_vec();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("sigma_rel")
        .y_desc("nimg")
        .x_labels(sigmas.len().min(10))
        .y_labels(nimgs.len().min(10))
        .x_label_formatter(&|i| {
            sig_labels
                .get(*i as usize)
                .map_or(String::new(), |s| format!("{s:.3}"))
        })
        .y_label_formatter(&|i| {
            nimg_labels
                .get(*i as usize)
                .map_or(String::new(), |n| n.to_string())
        })
        .label_style(("sans-serif", 10))
        .draw()
        .map_err(draw_error)?;
    let best = best_of(values, lower);
    for v in values {
        let x = sigmas.iter().position(|s| *s == v.0.sigma_rel).unwrap_or(0) as i32;
        let y = nimgs.iter().position(|n| *n == v.0.nimg).unwrap_or(0) as i32;
        let t = (v.1 - lo) / span;
        let colour = ramp(if lower { t } else { 1.0 - t });
        chart
            .draw_series([Rectangle::new([(x, y), (x + 1, y + 1)], colour.filled())])
            .map_err(draw_error)?;
        if std::ptr::eq(v.0, best.0) {
            chart
                .draw_series([Rectangle::new(
                    [(x, y), (x + 1, y + 1)],
                    WHITE.stroke_width(3),
                )])
                .map_err(draw_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::SweepStatus;

    fn point(idx: i64, sigma_rel: f64, nimg: i64, fid: Option<f64>) -> PointRow {
        PointRow {
            sweep_id: 1,
            idx,
            sigma_rel,
            nimg,
            status: if fid.is_some() {
                SweepStatus::Done
            } else {
                SweepStatus::Queued
            },
            lease_owner: None,
            lease_worker: None,
            lease_expires: None,
            attempts: 1,
            reconstruction_id: None,
            result: fid.map(|f| {
                serde_json::json!({
                    "fid": {"mean": f, "std": 0.5, "values": [f - 0.5, f + 0.5]},
                    "num_images": 100, "seed_sets": 2, "reconstruction": "r",
                    "timings": {"reconstruct_s": 0.0, "batches_s": 1.0, "metrics_s": 0.1,
                                "images_per_s": 200.0}
                })
            }),
            error: None,
            grid_digest: None,
            stats_digest: None,
            started_at: None,
            finished_at: None,
            batches_done: 0,
            images_done: 0,
            batch_seconds: 0.0,
        }
    }

    fn sweep() -> SweepRow {
        SweepRow {
            id: 1,
            run: "r".into(),
            run_id: 1,
            reference_id: Some(1),
            evaluator: crate::db::Evaluator::Builtin,
            spec: serde_json::json!({}),
            status: SweepStatus::Running,
            created_at: String::new(),
            finished_at: None,
            points: 0,
            points_done: 0,
            points_failed: 0,
            images_done: 0,
        }
    }

    #[test]
    fn curve_marks_the_best_point_and_skips_unfinished_ones() {
        let points = [
            point(0, 0.05, 100, Some(12.0)),
            point(1, 0.10, 100, Some(9.5)),
            point(2, 0.15, 100, Some(11.0)),
            point(3, 0.20, 100, None),
        ];
        let svg = sweep_svg(&sweep(), &points, "fid").unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("best σ_rel 0.100: 9.500"), "{svg}");
        assert!(svg.contains("(3 of 4 points)"));
        assert!(sweep_svg(&sweep(), &points, "kid").is_err());
    }

    #[test]
    fn two_training_times_draw_a_heat_map() {
        let points = [
            point(0, 0.05, 100, Some(12.0)),
            point(1, 0.10, 100, Some(9.5)),
            point(2, 0.05, 200, Some(8.0)),
            point(3, 0.10, 200, Some(7.0)),
        ];
        let svg = sweep_svg(&sweep(), &points, "fid").unwrap();
        assert!(svg.contains("over (sigma_rel, nimg)"));
        assert!(svg.contains("nimg 200"));
    }
}
