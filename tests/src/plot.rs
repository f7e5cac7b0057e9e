//! SVG plots of the benchmarks, xtask's and `lb-bpf-bench`'s (plotters' SVG backend: text is
//! left to the viewer's fonts, so nothing but Rust is needed to draw them).
//!
//! * [`bars`]: a bar chart of ratios (`bench lab`, `bench datapath`), with a reference line.
//! * [`Series`] and [`timeline`]: lines over time in stacked panels (`bench adaptive`).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colours of the lines and bars, in order.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e:?}")
}

/// A bar per `(label, value)`, a dashed line at `reference` (e.g. 1.0: no cost).
pub fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    values: &[(String, f64)],
    reference: Option<(f64, &str)>,
) -> Result<()> {
    let width = (160 + 150 * values.len() as u32).max(640);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = values
        .iter()
        .map(|(_, v)| *v)
        .chain(reference.map(|r| r.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.15;
    let top = if top > 0.0 { top } else { 1.0 };
    let n = values.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => values.get(*i).map(|v| v.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, (_, v))| {
            let c = PALETTE[i % PALETTE.len()];
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                c.mix(0.8).filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.2}"),
                (SegmentValue::CenterOf(i), *v + top * 0.02),
                ("sans-serif", 13)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))
        .map_err(err)?;
    if let Some((r, label)) = reference {
        chart
            .draw_series(DashedLineSeries::new(
                [(SegmentValue::Exact(0), r), (SegmentValue::Exact(n), r)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(err)?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One line of a panel: a name, its points, a colour and whether it is dashed.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dashed: bool,
}

/// Marks on a panel: (x, y, label) drawn as `shape` in `color`, with a legend entry `name`.
pub struct Marks {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub cross: bool,
}

/// One panel of a [`timeline`].
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
    pub marks: Vec<Marks>,
}

/// Stacked panels sharing the time axis (seconds), one SVG.
pub fn timeline(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 360 * panels.len() as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let x_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
        .fold(1.0f64, f64::max);
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let ys = || {
            panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .filter(|y| y.is_finite())
        };
        let y_max = ys().fold(0.0f64, f64::max).max(1.0) * 1.1;
        let mut b = ChartBuilder::on(area);
        b.caption(&panel.title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60);
        if panel.log_y {
            let y_min = ys()
                .filter(|y| *y > 0.0)
                .fold(f64::MAX, f64::min)
                .min(y_max / 10.0);
            let mut chart = b
                .build_cartesian_2d(0.0..x_max, (y_min * 0.8..y_max * 1.5).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("seconds since the load started")
                .y_desc(&panel.y_label)
                .y_labels(12)
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()
                .map_err(err)?;
            draw_lines(&mut chart, panel)?;
        } else {
            let mut chart = b.build_cartesian_2d(0.0..x_max, 0.0..y_max).map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("seconds since the load started")
                .y_desc(&panel.y_label)
                .draw()
                .map_err(err)?;
            draw_lines(&mut chart, panel)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

fn draw_lines<'a, Y>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    panel: &Panel,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    for s in &panel.series {
        let style = s.color.stroke_width(2);
        let pts = s.points.iter().copied().filter(|p| p.1.is_finite());
        let (c, name) = (s.color, s.name.clone());
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 5, 3, style))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        } else {
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
    }
    for m in &panel.marks {
        let c = m.color;
        let cross = m.cross;
        let anno = chart
            .draw_series(m.points.iter().map(
                move |&(x, y)| -> DynElement<'static, SVGBackend<'a>, (f64, f64)> {
                    if cross {
                        Cross::new((x, y), 6, c.stroke_width(2)).into_dyn()
                    } else {
                        TriangleMarker::new((x, y), 5, c.filled()).into_dyn()
                    }
                },
            ))
            .map_err(err)?;
        anno.label(m.name.clone()).legend(move |(x, y)| {
            if cross {
                Cross::new((x + 9, y), 5, c.stroke_width(2)).into_dyn()
            } else {
                TriangleMarker::new((x + 9, y), 5, c.filled()).into_dyn()
            }
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn draws_bars_and_timelines() {
        let dir =
            TempDir(std::env::temp_dir().join(format!("lb-plot-test-{}", std::process::id())));
        std::fs::create_dir_all(dir.path()).unwrap();
        let bars_path = dir.path().join("bars.svg");
        bars(
            &bars_path,
            "ratios",
            "x",
            &[("a".into(), 1.5), ("b".into(), 0.9)],
            Some((1.0, "parity")),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&bars_path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("1.50") && svg.contains("parity"));
        let tl = dir.path().join("tl.svg");
        let panel = |log_y| Panel {
            title: "p".into(),
            y_label: "ms".into(),
            log_y,
            series: vec![Series {
                name: "p99".into(),
                points: vec![(0.0, 10.0), (1.0, 100.0), (2.0, f64::NAN)],
                color: PALETTE[0],
                dashed: false,
            }],
            marks: vec![Marks {
                name: "drain".into(),
                points: vec![(1.0, 50.0)],
                color: PALETTE[3],
                cross: true,
            }],
        };
        timeline(&tl, "t", &[panel(true), panel(false)]).unwrap();
        let svg = std::fs::read_to_string(&tl).unwrap();
        assert!(svg.contains("p99") && svg.contains("drain"));
    }
}
