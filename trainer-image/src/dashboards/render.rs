//! `taper dashboards render`: each dashboard's panels drawn from a Prometheus over a time
//! range as PNG charts (plotters), laid out on Grafana's grid as the chart's JSON lays
//! them out, so that a person can see what Grafana will show without a Grafana.
//!
//! Grafana's variables are filled as Grafana would: a value given on the command line, else
//! the first of the variable's `label_values` over the range; `$__rate_interval` is
//! `max(step + scrape interval, 4 × scrape interval)`, the step being a 300th of the range
//! (at least 1 s), as Grafana's `$__interval` for a panel about 300 pixels wide.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    Dashboard, Needs, Panel, PanelKind,
    draw::{dashboard_size, draw_dashboard, draw_panel_alone, panel_size, save_png},
    prom::Prometheus,
};

/// Why a render failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A malformed URL.
    #[error("bad URL {0}")]
    Url(String),
    /// Prometheus could not be reached or did not answer with JSON.
    #[error("prometheus: {0}")]
    Http(String),
    /// Prometheus refused a query.
    #[error("prometheus refused {query}: {error}")]
    Prometheus {
        /// The query.
        query: String,
        /// Its error.
        error: String,
    },
    /// A variable has no value given and none in Prometheus.
    #[error(
        "variable ${name}: no value given (--var {name}=…) and no series of {selector} in the range"
    )]
    NoValue {
        /// The variable.
        name: String,
        /// Its `label_values` selector.
        selector: String,
    },
    /// No usable TrueType font.
    #[error("font: {0}")]
    Font(String),
    /// Drawing failed.
    #[error("drawing: {0}")]
    Draw(String),
    /// A file could not be written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: String,
    },
    /// A bad time range.
    #[error("time range: {0}")]
    Range(String),
}

/// The time range of a render and its query step, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// Start (unix seconds).
    pub start: f64,
    /// End (unix seconds).
    pub end: f64,
    /// Query resolution (whole seconds).
    pub step: f64,
}

impl Window {
    /// The range `start..end` with a step of a 300th of it, at least 1 s.
    pub fn new(start: f64, end: f64) -> Result<Self, RenderError> {
        if !(start.is_finite() && end.is_finite() && end > start) {
            return Err(RenderError::Range(format!(
                "start {start} must be before end {end}"
            )));
        }
        let step = ((end - start) / 300.0).ceil().max(1.0);
        Ok(Self { start, end, step })
    }

    /// Grafana's `$__rate_interval` for this step and a scrape interval, in seconds.
    pub fn rate_interval(&self, scrape_interval: f64) -> f64 {
        (self.step + scrape_interval)
            .max(4.0 * scrape_interval)
            .ceil()
    }
}

/// Grafana's variable substitution: `$__rate_interval`, `${name}` and `$name` (longest
/// names first, so that `$job` does not eat into `$job_kind`).
pub fn substitute(expr: &str, vars: &BTreeMap<String, String>, rate_interval: f64) -> String {
    let mut out = expr.replace("$__rate_interval", &format!("{rate_interval}s"));
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &vars[name])
            .replace(&format!("${name}"), &vars[name]);
    }
    out
}

/// A series' name from Grafana's legend format (`{{label}}` replaced by the label's
/// value); with an empty format, the series' labels as PromQL writes them.
pub fn legend(format: &str, labels: &BTreeMap<String, String>) -> String {
    if format.is_empty() {
        let inner: Vec<String> = labels
            .iter()
            .filter(|(k, _)| *k != "__name__")
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        let name = labels.get("__name__").cloned().unwrap_or_default();
        return format!("{name}{{{}}}", inner.join(", "));
    }
    let mut out = String::new();
    let mut rest = format;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        match after.find("}}") {
            Some(close) => {
                let key = after[..close].trim();
                out.push_str(labels.get(key).map(String::as_str).unwrap_or_default());
                rest = &after[close + 2..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Three significant digits, without a trailing `.0`.
fn sig3(v: f64) -> String {
    let a = v.abs();
    let text = if a == 0.0 {
        "0".to_string()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.001 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    };
    if text.contains('.') && !text.contains('e') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// `v` scaled by the largest of `steps` (factor, suffix) it reaches.
fn scaled(v: f64, steps: &[(f64, &str)]) -> String {
    let a = v.abs();
    for (factor, suffix) in steps.iter().rev() {
        if a >= *factor {
            return format!("{}{suffix}", sig3(v / factor));
        }
    }
    sig3(v)
}

/// A value as Grafana shows it for the panel's unit.
pub fn format_value(unit: &str, v: f64) -> String {
    const SI: [(f64, &str); 4] = [(1e3, " K"), (1e6, " M"), (1e9, " B"), (1e12, " T")];
    const IEC: [(f64, &str); 5] = [
        (1.0, " B"),
        (1024.0, " KiB"),
        (1_048_576.0, " MiB"),
        (1_073_741_824.0, " GiB"),
        (1_099_511_627_776.0, " TiB"),
    ];
    match unit {
        "s" => {
            let a = v.abs();
            if a == 0.0 {
                "0 s".into()
            } else if a < 1e-3 {
                format!("{} µs", sig3(v * 1e6))
            } else if a < 1.0 {
                format!("{} ms", sig3(v * 1e3))
            } else if a < 60.0 {
                format!("{} s", sig3(v))
            } else if a < 3600.0 {
                format!("{} min", sig3(v / 60.0))
            } else if a < 86400.0 {
                format!("{} hour", sig3(v / 3600.0))
            } else {
                format!("{} day", sig3(v / 86400.0))
            }
        }
        "percentunit" => format!("{}%", sig3(v * 100.0)),
        "percent" => format!("{}%", sig3(v)),
        "bytes" => scaled(v, &IEC),
        "decmbytes" => scaled(
            v * 1e6,
            &[
                (1.0, " B"),
                (1e3, " kB"),
                (1e6, " MB"),
                (1e9, " GB"),
                (1e12, " TB"),
            ],
        ),
        "ops" => format!("{} ops/s", scaled(v, &SI).trim_end()),
        _ => scaled(v, &SI),
    }
}

/// A tick label for unix time `t` (UTC): seconds shown on ranges under 10 minutes, the
/// date on ranges over 2 days.
pub fn time_label(t: f64, span: f64) -> String {
    let secs = t.floor() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if span < 600.0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else if span <= 2.0 * 86400.0 {
        format!("{h:02}:{m:02}")
    } else {
        let (_, month, day) = civil(days);
        format!("{month:02}-{day:02} {h:02}:{m:02}")
    }
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A line broken where samples are missing: runs of points no more than `max_gap` apart.
pub fn segments(points: &[(f64, f64)], max_gap: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    for &p in points {
        match out.last_mut() {
            Some(run) if run.last().is_some_and(|l| p.0 - l.0 <= max_gap) => run.push(p),
            _ => out.push(vec![p]),
        }
    }
    out
}

/// One drawn series.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Its legend.
    pub name: String,
    /// Its samples.
    pub points: Vec<(f64, f64)>,
}

/// What a dashboard's render drew: the variables used and each panel's series.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The variables' values.
    pub vars: BTreeMap<String, String>,
    /// Each panel's series, in the dashboard's order.
    pub panels: Vec<Vec<Series>>,
}

/// Fill the dashboard's variables (given ones first, then Prometheus' first label value)
/// and run every panel query over the window.
pub async fn fetch(
    prom: &Prometheus,
    dashboard: &Dashboard,
    given: &BTreeMap<String, String>,
    window: &Window,
    scrape_interval: f64,
) -> Result<Fetched, RenderError> {
    let rate = window.rate_interval(scrape_interval);
    let mut vars = BTreeMap::new();
    for v in &dashboard.variables {
        let value = match given.get(v.name) {
            Some(value) => value.clone(),
            None => {
                let selector = substitute(&v.selector, &vars, rate);
                prom.label_values(v.label_name, &selector, window)
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| RenderError::NoValue {
                        name: v.name.to_string(),
                        selector,
                    })?
            }
        };
        vars.insert(v.name.to_string(), value);
    }
    let mut panels = Vec::new();
    for p in &dashboard.panels {
        let mut series = Vec::new();
        for q in &p.queries {
            let expr = substitute(&q.expr, &vars, rate);
            for s in prom.range(&expr, window).await? {
                if !s.points.is_empty() {
                    series.push(Series {
                        name: legend(q.legend, &s.labels),
                        points: s.points,
                    });
                }
            }
        }
        panels.push(series);
    }
    Ok(Fetched { vars, panels })
}

/// A panel's place on Grafana's grid: columns (of 24) and rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GridPos {
    /// Column.
    pub x: u32,
    /// Row.
    pub y: u32,
    /// Width in columns.
    pub w: u32,
    /// Height in rows.
    pub h: u32,
}

/// Panels left to right, wrapping at 24 columns; a stat is 4 rows high, a graph 8.
pub fn layout(panels: &[Panel]) -> Vec<GridPos> {
    let (mut x, mut y, mut row_height) = (0u32, 0u32, 0u32);
    panels
        .iter()
        .map(|p| {
            let h = if p.kind == PanelKind::Stat { 4 } else { 8 };
            if x + p.width > 24 {
                x = 0;
                y += row_height;
                row_height = 0;
            }
            let pos = GridPos {
                x,
                y,
                w: p.width,
                h,
            };
            x += p.width;
            row_height = row_height.max(h);
            pos
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS` of unix time `t`.
pub fn date_time(t: f64) -> String {
    let secs = t.floor() as i64;
    let (y, mo, d) = civil(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    format!(
        "{y}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What one render wrote, printed as JSON.
#[derive(Debug, Serialize)]
pub struct Rendered {
    /// The dashboard's title.
    pub dashboard: String,
    /// The whole dashboard's PNG.
    pub png: PathBuf,
    /// The variables' values.
    pub variables: BTreeMap<String, String>,
    /// Each panel.
    pub panels: Vec<RenderedPanel>,
}

/// One panel of a render.
#[derive(Debug, Serialize)]
pub struct RenderedPanel {
    /// Its title.
    pub title: String,
    /// Series drawn.
    pub series: usize,
    /// Samples drawn.
    pub points: usize,
    /// What it needs to show data (`taper` or `dcgm`).
    pub needs: &'static str,
    /// Its own PNG.
    pub png: PathBuf,
}

/// Slug of a panel title for its file name.
fn slug(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Write the dashboard's PNG as `<out>/<file>.png` and each panel's as
/// `<out>/<file>/<NN>-<title>.png`.
pub fn write(
    dashboard: &Dashboard,
    fetched: &Fetched,
    window: &Window,
    width: u32,
    out: &Path,
) -> Result<Rendered, RenderError> {
    let io = |path: &Path, e: std::io::Error| RenderError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let dir = out.join(dashboard.file);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let png = out.join(format!("{}.png", dashboard.file));
    let size = dashboard_size(dashboard, width);
    save_png(
        &png,
        draw_dashboard(dashboard, fetched, window, width)?,
        size,
    )?;
    let mut panels = Vec::new();
    for (i, ((panel, pos), series)) in dashboard
        .panels
        .iter()
        .zip(layout(&dashboard.panels))
        .zip(&fetched.panels)
        .enumerate()
    {
        let size = panel_size(pos, width);
        let path = dir.join(format!("{:02}-{}.png", i + 1, slug(panel.title)));
        save_png(&path, draw_panel_alone(panel, series, window, size)?, size)?;
        panels.push(RenderedPanel {
            title: panel.title.to_string(),
            series: series.len(),
            points: series.iter().map(|s| s.points.len()).sum(),
            needs: match panel.needs {
                Needs::Taper => "taper",
                Needs::Dcgm => "dcgm",
            },
            png: path,
        });
    }
    Ok(Rendered {
        dashboard: dashboard.title.to_string(),
        png,
        variables: fetched.vars.clone(),
        panels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shown_in_the_panels_units_as_grafana_shows_them() {
        let cases = [
            ("s", 0.000_25, "250 µs"),
            ("s", 0.412, "412 ms"),
            ("s", 2.5, "2.5 s"),
            ("s", 90.0, "1.5 min"),
            ("s", 5400.0, "1.5 hour"),
            ("percentunit", 0.3312, "33.1%"),
            ("percent", 87.0, "87%"),
            ("bytes", 512.0, "512 B"),
            ("bytes", 1536.0, "1.5 KiB"),
            ("bytes", 44_040_192.0, "42 MiB"),
            ("decmbytes", 2500.0, "2.5 GB"),
            ("short", 12_345.0, "12.3 K"),
            ("short", 0.5, "0.5"),
            ("short", 3.0, "3"),
            ("ops", 2.25, "2.25 ops/s"),
        ];
        for (unit, v, want) in cases {
            assert_eq!(format_value(unit, v), want, "{unit} {v}");
        }
    }

    #[test]
    fn variables_and_the_rate_interval_are_filled_as_grafana_fills_them() {
        let vars: BTreeMap<String, String> = [("job", "gpt"), ("operator_job", "op")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            substitute(
                r#"rate(x{name="$job", job="$operator_job", j="${job}"}[$__rate_interval])"#,
                &vars,
                120.0
            ),
            r#"rate(x{name="gpt", job="op", j="gpt"}[120s])"#
        );
        // One hour: a 12 s step; Grafana's max(step + scrape, 4 × scrape).
        let w = Window::new(0.0, 3600.0).expect("window");
        assert_eq!(w.step, 12.0);
        assert_eq!(w.rate_interval(30.0), 120.0);
        assert_eq!(w.rate_interval(1.0), 13.0);
        let day = Window::new(0.0, 86400.0).expect("window");
        assert_eq!(day.step, 288.0);
        assert_eq!(day.rate_interval(15.0), 303.0);
        assert!(Window::new(10.0, 10.0).is_err());
    }

    #[test]
    fn legends_take_their_labels_from_the_series() {
        let labels: BTreeMap<String, String> =
            [("__name__", "up"), ("pod", "gpt-pretrain-x"), ("gpu", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(
            legend("{{pod}} GPU {{ gpu }}", &labels),
            "gpt-pretrain-x GPU 0"
        );
        assert_eq!(legend("{{missing}}train", &labels), "train");
        assert_eq!(legend("", &labels), r#"up{gpu="0", pod="gpt-pretrain-x"}"#);
        assert_eq!(legend("a {{pod", &labels), "a {{pod");
    }

    #[test]
    fn time_labels_are_utc() {
        // 1796033959 is 2026-11-30 10:19:19 UTC (`date -u -d @1796033959`).
        let t = 1_796_033_959.0;
        assert_eq!(time_label(t, 300.0), "10:19:19");
        assert_eq!(time_label(t, 3600.0), "10:19");
        assert_eq!(time_label(t, 7.0 * 86400.0), "11-30 10:19");
        assert_eq!(date_time(t), "2026-11-30 10:19:19");
        assert_eq!(date_time(951_782_400.0), "2000-02-29 00:00:00");
    }

    #[test]
    fn lines_break_where_samples_are_missing() {
        let points = [
            (0.0, 1.0),
            (10.0, 2.0),
            (20.0, 3.0),
            (60.0, 4.0),
            (70.0, 5.0),
            (200.0, 6.0),
        ];
        let runs = segments(&points, 15.0);
        let lens: Vec<usize> = runs.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![3, 2, 1]);
    }
}
