//! Drawing a dashboard with plotters into an RGB buffer: a header with the variables and
//! the range, then each panel where Grafana's grid puts it (a graph with a legend, a stat
//! with its last value, or "No data" with the reason), on a light theme.

use std::path::{Path, PathBuf};

use plotters::{
    coord::Shift,
    prelude::*,
    style::{FontStyle, RGBColor},
};

use super::render::{
    Fetched, RenderError, Series, Window, date_time, format_value, layout, segments, time_label,
};
use super::{Dashboard, Needs, Panel, PanelKind};

fn draw_err(e: impl std::fmt::Display) -> RenderError {
    RenderError::Draw(e.to_string())
}

/// Pixels of one grid row.
const ROW_PX: u32 = 34;
/// Pixels of the header (title, variables, range).
const HEADER_PX: u32 = 58;
/// Pixels between panels.
const GAP_PX: u32 = 8;

const BACKGROUND: RGBColor = RGBColor(244, 245, 245);
const PANEL: RGBColor = RGBColor(255, 255, 255);
const BORDER: RGBColor = RGBColor(214, 217, 221);
const TEXT: RGBColor = RGBColor(36, 41, 46);
const MUTED: RGBColor = RGBColor(110, 118, 129);
const GRID: RGBColor = RGBColor(232, 234, 237);
/// Grafana's classic palette.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(115, 191, 105),
    RGBColor(242, 204, 12),
    RGBColor(87, 148, 242),
    RGBColor(255, 120, 10),
    RGBColor(242, 73, 92),
    RGBColor(184, 119, 217),
    RGBColor(31, 120, 193),
    RGBColor(112, 219, 237),
];

/// Load a TrueType font for the charts' text: `path`, else DejaVu Sans or Liberation Sans
/// from the usual system folders. Bold is used when a bold face sits beside it.
pub fn load_font(path: Option<&Path>) -> Result<PathBuf, RenderError> {
    let candidates: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_path_buf()],
        None => [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/local/share/fonts/DejaVuSans.ttf",
            "/Library/Fonts/Arial.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
    };
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        return Err(RenderError::Font(format!(
            "no TrueType font found (looked for {}); install fonts-dejavu-core or pass --font",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let register = |file: &Path, style: FontStyle| -> Result<(), RenderError> {
        let bytes = std::fs::read(file).map_err(|e| RenderError::Io {
            path: file.to_path_buf(),
            error: e.to_string(),
        })?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", style, bytes)
            .map_err(|_| RenderError::Font(format!("{} is not a TrueType font", file.display())))
    };
    register(found, FontStyle::Normal)?;
    let name = found.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let bold = found.with_file_name(match name {
        "DejaVuSans.ttf" => "DejaVuSans-Bold.ttf".to_string(),
        n => n.replace("Regular", "Bold"),
    });
    if bold != *found && bold.is_file() {
        register(&bold, FontStyle::Bold)?;
    } else {
        register(found, FontStyle::Bold)?;
    }
    Ok(found.clone())
}

fn font(size: u32, color: &RGBColor) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(color)
}

fn bold(size: u32, color: &RGBColor) -> TextStyle<'static> {
    ("sans-serif", size)
        .into_font()
        .style(FontStyle::Bold)
        .color(color)
}

/// The y range of the series: their extremes, widened by 5 %, or around a flat value.
fn y_range(series: &[Series]) -> (f64, f64) {
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    // A range that stays positive starts at zero when it is close to it, as Grafana's does.
    let bottom = if lo >= 0.0 && lo - pad < 0.0 {
        0.0
    } else {
        lo - pad
    };
    (bottom, hi + pad)
}

/// Draw one panel into `area`: its title, then the graph, the stat, or "No data".
pub fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    series: &[Series],
    window: &Window,
) -> Result<(), RenderError> {
    area.fill(&PANEL).map_err(draw_err)?;
    let (w, h) = area.dim_in_pixel();
    area.draw(&Rectangle::new(
        [(0, 0), (w as i32 - 1, h as i32 - 1)],
        BORDER.stroke_width(1),
    ))
    .map_err(draw_err)?;
    area.draw(&Text::new(panel.title, (10, 8), bold(14, &TEXT)))
        .map_err(draw_err)?;
    let inner = area.clone().margin(30, 8, 8, 12);
    if series.is_empty() {
        let (iw, ih) = inner.dim_in_pixel();
        let why = match panel.needs {
            Needs::Taper => "No data",
            Needs::Dcgm => "No data (needs NVIDIA's dcgm-exporter on GPU nodes)",
        };
        inner
            .draw(&Text::new(
                why,
                (iw as i32 / 2, ih as i32 / 2),
                font(13, &MUTED).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                )),
            ))
            .map_err(draw_err)?;
        return Ok(());
    }
    match panel.kind {
        PanelKind::Stat => draw_stat(&inner, panel, series),
        PanelKind::TimeSeries => draw_graph(&inner, panel, series, window),
    }
}

fn draw_stat<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    series: &[Series],
) -> Result<(), RenderError> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let (w, h) = area.dim_in_pixel();
    let shown = &series[..series.len().min(3)];
    let slot = w as i32 / shown.len() as i32;
    for (i, s) in shown.iter().enumerate() {
        // Grafana's "last not null".
        let Some(&(_, last)) = s.points.last() else {
            continue;
        };
        let x = slot * i as i32 + slot / 2;
        let size = if shown.len() == 1 { 34 } else { 26 };
        area.draw(&Text::new(
            format_value(panel.unit, last),
            (x, h as i32 / 2 - 8),
            bold(size, &PALETTE[i % PALETTE.len()]).pos(Pos::new(HPos::Center, VPos::Center)),
        ))
        .map_err(draw_err)?;
        area.draw(&Text::new(
            s.name.clone(),
            (x, h as i32 - 12),
            font(11, &MUTED).pos(Pos::new(HPos::Center, VPos::Center)),
        ))
        .map_err(draw_err)?;
    }
    Ok(())
}

fn draw_graph<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    series: &[Series],
    window: &Window,
) -> Result<(), RenderError> {
    let (lo, hi) = y_range(series);
    let span = window.end - window.start;
    let mut chart = ChartBuilder::on(area)
        .x_label_area_size(20)
        .y_label_area_size(64)
        .build_cartesian_2d(window.start..window.end, lo..hi)
        .map_err(draw_err)?;
    let time_fmt = |t: &f64| time_label(*t, span);
    let value_fmt = |v: &f64| format_value(panel.unit, *v);
    chart
        .configure_mesh()
        .light_line_style(PANEL)
        .bold_line_style(GRID)
        .axis_style(BORDER)
        .x_labels(6)
        .y_labels(5)
        .x_label_formatter(&time_fmt)
        .y_label_formatter(&value_fmt)
        .label_style(font(11, &MUTED))
        .draw()
        .map_err(draw_err)?;
    // A gap in the samples longer than two steps and a scrape is drawn as a gap.
    let max_gap = 2.5 * window.step.max(1.0) + 1.0;
    // Lines are two 1-pixel lines a pixel apart: plotters turns wider strokes into polygons
    // that break up into dots where samples lie a pixel or two apart.
    let pixel = (hi - lo) / f64::from(chart.plotting_area().dim_in_pixel().1.max(1));
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        for (j, run) in segments(&s.points, max_gap).into_iter().enumerate() {
            let drawn = if run.len() == 1 {
                // A lone sample: a dot, so that it is not lost.
                chart
                    .draw_series(std::iter::once(Circle::new(run[0], 2, color.filled())))
                    .map_err(draw_err)?
            } else {
                let below: Vec<(f64, f64)> = run.iter().map(|&(t, v)| (t, v - pixel)).collect();
                chart
                    .draw_series(LineSeries::new(below, color.stroke_width(1)))
                    .map_err(draw_err)?;
                chart
                    .draw_series(LineSeries::new(run, color.stroke_width(1)))
                    .map_err(draw_err)?
            };
            if j == 0 {
                drawn.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(3))
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(PANEL.mix(0.85))
        .border_style(BORDER)
        .label_font(font(11, &TEXT))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Encode an RGB buffer as PNG.
pub(crate) fn save_png(path: &Path, buf: Vec<u8>, (w, h): (u32, u32)) -> Result<(), RenderError> {
    let io = |e: String| RenderError::Io {
        path: path.to_path_buf(),
        error: e,
    };
    let image = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| io("buffer size".into()))?;
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| io(e.to_string()))
}

/// Pixel size of a panel drawn alone, for a dashboard `width` pixels wide.
pub fn panel_size(pos: super::render::GridPos, width: u32) -> (u32, u32) {
    (
        (f64::from(pos.w) * f64::from(width) / 24.0).round() as u32,
        pos.h * ROW_PX,
    )
}

/// Pixel size of a whole dashboard `width` pixels wide.
pub fn dashboard_size(dashboard: &Dashboard, width: u32) -> (u32, u32) {
    let rows = layout(&dashboard.panels)
        .iter()
        .map(|p| p.y + p.h)
        .max()
        .unwrap_or(0);
    (width, HEADER_PX + rows * ROW_PX + GAP_PX)
}

/// The whole dashboard drawn into an RGB buffer of [`dashboard_size`].
pub fn draw_dashboard(
    dashboard: &Dashboard,
    fetched: &Fetched,
    window: &Window,
    width: u32,
) -> Result<Vec<u8>, RenderError> {
    let (w, h) = dashboard_size(dashboard, width);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&BACKGROUND).map_err(draw_err)?;
        root.draw(&Text::new(
            dashboard.title,
            (GAP_PX as i32, 10),
            bold(20, &TEXT),
        ))
        .map_err(draw_err)?;
        let vars: Vec<String> = fetched
            .vars
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        let subtitle = format!(
            "{}    {} → {} UTC ({}), step {} s",
            vars.join("    "),
            date_time(window.start),
            date_time(window.end),
            format_value("s", window.end - window.start),
            window.step
        );
        root.draw(&Text::new(subtitle, (GAP_PX as i32, 36), font(12, &MUTED)))
            .map_err(draw_err)?;
        let col = f64::from(w - GAP_PX) / 24.0;
        for ((panel, pos), series) in dashboard
            .panels
            .iter()
            .zip(layout(&dashboard.panels))
            .zip(&fetched.panels)
        {
            let x = GAP_PX as i32 + (f64::from(pos.x) * col).round() as i32;
            let y = (HEADER_PX + pos.y * ROW_PX) as i32;
            let pw = (f64::from(pos.w) * col).round() as u32 - GAP_PX;
            let ph = pos.h * ROW_PX - GAP_PX;
            let area = root.clone().shrink((x, y), (pw, ph));
            draw_panel(&area, panel, series, window)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

/// One panel drawn alone into an RGB buffer of `size`.
pub fn draw_panel_alone(
    panel: &Panel,
    series: &[Series],
    window: &Window,
    (w, h): (u32, u32),
) -> Result<Vec<u8>, RenderError> {
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_panel(&root, panel, series, window)?;
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dashboards::{self, training};

    /// Pixels within a small distance of `color` (anti-aliased edges blend into the
    /// background) in the rectangle `(x, y, w, h)` of an RGB buffer `width` wide.
    fn count(buf: &[u8], width: u32, (x, y, w, h): (u32, u32, u32, u32), color: RGBColor) -> usize {
        let mut n = 0;
        for row in y..y + h {
            for col in x..x + w {
                let i = ((row * width + col) * 3) as usize;
                let d: i32 = [color.0, color.1, color.2]
                    .iter()
                    .zip(&buf[i..i + 3])
                    .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
                    .sum();
                if d <= 24 {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn a_dashboard_draws_each_series_in_its_own_panel_on_grafanas_grid() {
        load_font(None).expect("a TrueType font (Debian: fonts-dejavu-core)");
        let d = training();
        let window = Window::new(1_796_000_000.0, 1_796_000_600.0).expect("window");
        // The first graph gets a falling loss; every other panel stays empty.
        let graph = d
            .panels
            .iter()
            .position(|p| p.kind == PanelKind::TimeSeries)
            .expect("a graph");
        let empty_graph = d
            .panels
            .iter()
            .enumerate()
            .position(|(i, p)| i != graph && p.kind == PanelKind::TimeSeries)
            .expect("another graph");
        let mut panels = vec![Vec::new(); d.panels.len()];
        panels[graph] = vec![Series {
            name: "train".into(),
            // Samples at the query step, as Prometheus answers a range query.
            points: (0..=300)
                .map(|i| {
                    let i = f64::from(i);
                    (window.start + window.step * i, 4.0 - 0.006 * i)
                })
                .collect(),
        }];
        let fetched = Fetched {
            vars: BTreeMap::from([("job".to_string(), "gpt".to_string())]),
            panels,
        };
        let width = 1200;
        let buf = draw_dashboard(&d, &fetched, &window, width).expect("drawn");
        let (w, h) = dashboard_size(&d, width);
        assert_eq!(buf.len(), (w * h * 3) as usize);
        if let Ok(dir) = std::env::var("TAPER_RENDER_DEBUG") {
            save_png(&Path::new(&dir).join("training.png"), buf.clone(), (w, h)).expect("png");
        }
        let col = f64::from(w - GAP_PX) / 24.0;
        let rect = |i: usize| {
            let pos = layout(&d.panels)[i];
            (
                GAP_PX + (f64::from(pos.x) * col).round() as u32,
                HEADER_PX + pos.y * ROW_PX,
                (f64::from(pos.w) * col).round() as u32 - GAP_PX,
                pos.h * ROW_PX - GAP_PX,
            )
        };
        let line = count(&buf, w, rect(graph), PALETTE[0]);
        // A 2-pixel line across most of a ~580-pixel-wide plot.
        assert!(
            line > 600,
            "the loss line is drawn in its panel: {line} pixels"
        );
        assert_eq!(count(&buf, w, rect(empty_graph), PALETTE[0]), 0);
        // Panels are white on the grey page.
        assert!(count(&buf, w, rect(empty_graph), PANEL) > 10_000);
        assert_eq!(count(&buf, w, (0, 0, w, HEADER_PX), PANEL), 0);
        // The chart's JSON places panels on the same grid.
        let json = d.to_grafana();
        for (i, pos) in layout(&d.panels).iter().enumerate() {
            assert_eq!(
                json["panels"][i]["gridPos"],
                serde_json::to_value(pos).expect("json")
            );
        }
        // Every dashboard draws with no data at all.
        for d in dashboards::all() {
            let none = Fetched {
                vars: BTreeMap::new(),
                panels: vec![Vec::new(); d.panels.len()],
            };
            draw_dashboard(&d, &none, &window, 800).expect("an empty dashboard draws");
        }
    }

    #[test]
    fn a_stat_shows_the_last_value_in_its_unit() {
        load_font(None).expect("font");
        let d = training();
        let stat = d
            .panels
            .iter()
            .find(|p| p.kind == PanelKind::Stat)
            .expect("stat");
        let window = Window::new(0.0, 100.0).expect("window");
        let series = vec![Series {
            name: "step".into(),
            points: vec![(10.0, 5.0), (90.0, 7.0)],
        }];
        let size = (400, 136);
        let with = draw_panel_alone(stat, &series, &window, size).expect("drawn");
        let without = draw_panel_alone(stat, &[], &window, size).expect("drawn");
        if let Ok(dir) = std::env::var("TAPER_RENDER_DEBUG") {
            save_png(&Path::new(&dir).join("stat.png"), with.clone(), size).expect("png");
        }
        // The value is written in the first series' colour, large.
        let value = count(&with, 400, (0, 0, 400, 136), PALETTE[0]);
        assert!(value > 60, "the value's pixels: {value}");
        assert_eq!(count(&without, 400, (0, 0, 400, 136), PALETTE[0]), 0);
    }
}
