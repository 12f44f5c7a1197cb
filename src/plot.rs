//! Pictures of reconstructions: each target's profile beside the reconstruction the snapshots
//! make of it, so a person sees at a glance where an EMA length is out of reach.

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::phema::{sample_profiles_realised, Snapshot, Tabulated, TargetSolution};

/// At most this many panels per picture; more targets are thinned evenly.
pub const MAX_PANELS: usize = 12;

/// Draws target (thick black) and reconstructed (thin orange) profiles of `solutions`, one panel per
/// target, as an SVG document. The horizontal axis is time as a fraction of the target time,
/// from where the target profile has almost no mass left; the vertical axis is the profile
/// density times the target time. `realised` gives the snapshots' profiles where they are not
/// the power functions their widths name (empty: none; see [`crate::phema::solve_realised`]).
pub fn profiles_svg(
    snapshots: &[Snapshot],
    realised: &[Option<Tabulated>],
    solutions: &[TargetSolution],
) -> Result<String> {
    if solutions.is_empty() {
        return Err(Error::invalid("targets", "nothing to plot"));
    }
    let shown: Vec<&TargetSolution> = if solutions.len() <= MAX_PANELS {
        solutions.iter().collect()
    } else {
        (0..MAX_PANELS)
            .map(|i| &solutions[i * (solutions.len() - 1) / (MAX_PANELS - 1)])
            .collect()
    };
    let cols = shown.len().min(4);
    let rows = shown.len().div_ceil(cols);
    let (panel_w, panel_h) = (360u32, 260u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(
            &mut svg,
            (panel_w * cols as u32, panel_h * rows as u32 + 30),
        )
        .into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let title = if shown.len() < solutions.len() {
            format!(
                "post-hoc EMA profiles ({} of {} targets): target thick black, reconstruction orange",
                shown.len(),
                solutions.len()
            )
        } else if cols == 1 {
            // One 360-pixel panel: a title that fits it.
            "target black, reconstruction orange".to_owned()
        } else {
            "post-hoc EMA profiles: target thick black, reconstruction orange".to_owned()
        };
        let (header, body) = root.split_vertically(30);
        header
            .titled(&title, ("sans-serif", 16))
            .map_err(draw_error)?;
        let panels = body.split_evenly((rows, cols));
        for (panel, sol) in panels.iter().zip(&shown) {
            draw_panel(panel, snapshots, realised, sol)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    snapshots: &[Snapshot],
    realised: &[Option<Tabulated>],
    sol: &TargetSolution,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let t = sol.nimg as f64;
    // The profile's mass sits within a few σ_rel of the end; show from there.
    let start = (1.0 - 8.0 * sol.sigma_rel).max(0.0);
    let points = sample_profiles_realised(snapshots, realised, sol, start * t, 400)?;
    let xy = |v: f64| v * t;
    let target: Vec<(f64, f64)> = points.iter().map(|p| (p.nimg / t, xy(p.target))).collect();
    let recon: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.nimg / t, xy(p.reconstructed)))
        .collect();
    let y_max = target
        .iter()
        .chain(&recon)
        .map(|p| p.1)
        .fold(0.0f64, f64::max)
        * 1.08;
    let y_min = recon.iter().map(|p| p.1).fold(0.0f64, f64::min) * 1.08;
    let error = if sol.relative_error >= 1e-4 {
        format!("{:.2}%", sol.relative_error * 100.0)
    } else {
        format!("{:.1e}", sol.relative_error)
    };
    let caption = format!(
        "σ_rel {:.3}: error {error}, gain {:.1}",
        sol.sigma_rel, sol.noise_gain
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 14))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(36)
        .build_cartesian_2d(start..1.0, y_min..y_max.max(1e-12))
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("time / target time")
        .x_labels(5)
        .y_labels(5)
        .label_style(("sans-serif", 10))
        .axis_desc_style(("sans-serif", 11))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(LineSeries::new(target, BLACK.stroke_width(4)))
        .map_err(draw_error)?;
    chart
        .draw_series(LineSeries::new(
            recon,
            RGBColor(230, 120, 0).stroke_width(2),
        ))
        .map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(err: DrawingAreaErrorKind<E>) -> Error {
    Error::invalid("plot", format!("drawing failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{edm2_schedule, sigma_sweep};
    use crate::phema::{solve, SolveOptions};

    #[test]
    fn one_panel_per_target_up_to_the_limit() {
        let snapshots = edm2_schedule(16, 1 << 20, &[0.05, 0.10]);
        for (count, panels) in [(1, 1), (5, 5), (12, 12), (40, 12)] {
            let targets = sigma_sweep(count, 0.03, 0.25);
            let solutions = solve(&snapshots, &targets, &SolveOptions::default()).unwrap();
            let svg = profiles_svg(&snapshots, &[], &solutions).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            assert_eq!(svg.matches("σ_rel 0.").count(), panels, "{count} targets");
            // Each panel draws one reconstruction (orange) and one target (4 px black).
            assert_eq!(svg.matches("stroke=\"#E67800\"").count(), panels);
            assert_eq!(svg.matches("stroke-width=\"4\"").count(), panels);
            assert_eq!(
                svg.contains(&format!("({panels} of {count} targets)")),
                count > panels
            );
        }
        assert!(profiles_svg(&snapshots, &[], &[]).is_err());
    }
}
