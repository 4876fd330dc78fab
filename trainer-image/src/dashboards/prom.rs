//! What `taper dashboards render` asks Prometheus: range queries and label values over
//! its HTTP API (`/api/v1/query_range`, `/api/v1/label/<name>/values`).

use std::collections::BTreeMap;

use serde_json::Value;

use super::render::{RenderError, Window};

/// One series of a range query: its labels and its finite samples `(unix seconds, value)`.
#[derive(Clone, Debug, PartialEq)]
pub struct RawSeries {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// Samples in time order; NaN and infinite samples are left out (drawn as gaps).
    pub points: Vec<(f64, f64)>,
}

/// A Prometheus server's HTTP API.
#[derive(Debug)]
pub struct Prometheus {
    client: reqwest::Client,
    base: url::Url,
}

impl Prometheus {
    /// The API of the server at `url` (`http://prometheus:9090`, or with a path prefix).
    pub fn new(url: &str) -> Result<Self, RenderError> {
        let mut text = url.trim().to_string();
        if !text.ends_with('/') {
            text.push('/');
        }
        let base = url::Url::parse(&text).map_err(|e| RenderError::Url(format!("{url}: {e}")))?;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| RenderError::Http(format!("HTTP client: {e}")))?;
        Ok(Self { client, base })
    }

    async fn get(&self, path: &str, params: &[(&str, String)]) -> Result<Value, RenderError> {
        let mut url = self
            .base
            .join(path)
            .map_err(|e| RenderError::Url(format!("{path}: {e}")))?;
        url.query_pairs_mut()
            .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| RenderError::Http(format!("{url}: {e}")))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| RenderError::Http(format!("{url}: {e}")))?;
        // Prometheus answers a bad query with 400 and a JSON error; anything else that is
        // not JSON (a proxy's page) is reported with its status.
        let answer: Value = serde_json::from_str(&body).map_err(|_| {
            RenderError::Http(format!(
                "{url}: HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            ))
        })?;
        if answer["status"] != "success" {
            return Err(RenderError::Prometheus {
                query: params
                    .iter()
                    .find(|(k, _)| *k == "query" || *k == "match[]")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                error: format!(
                    "{}: {}",
                    answer["errorType"].as_str().unwrap_or("error"),
                    answer["error"].as_str().unwrap_or("no message")
                ),
            });
        }
        Ok(answer)
    }

    /// The series of `expr` over the window, at its step.
    pub async fn range(&self, expr: &str, window: &Window) -> Result<Vec<RawSeries>, RenderError> {
        let answer = self
            .get(
                "api/v1/query_range",
                &[
                    ("query", expr.to_string()),
                    ("start", format!("{:.3}", window.start)),
                    ("end", format!("{:.3}", window.end)),
                    ("step", format!("{}", window.step)),
                ],
            )
            .await?;
        Ok(parse_matrix(&answer))
    }

    /// The values of `label` on the series that `selector` matches in the window, sorted.
    pub async fn label_values(
        &self,
        label: &str,
        selector: &str,
        window: &Window,
    ) -> Result<Vec<String>, RenderError> {
        let answer = self
            .get(
                &format!("api/v1/label/{label}/values"),
                &[
                    ("match[]", selector.to_string()),
                    ("start", format!("{:.3}", window.start)),
                    ("end", format!("{:.3}", window.end)),
                ],
            )
            .await?;
        let mut values: Vec<String> = answer["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        values.sort();
        Ok(values)
    }
}

/// The series of a `matrix` answer.
pub fn parse_matrix(answer: &Value) -> Vec<RawSeries> {
    answer["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| RawSeries {
            labels: s["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect(),
            points: s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let t = p.get(0)?.as_f64()?;
                    // Values come as strings: "1.5", "NaN", "+Inf".
                    let v: f64 = p.get(1)?.as_str()?.parse().ok()?;
                    v.is_finite().then_some((t, v))
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_matrix_answer_becomes_series_without_non_finite_samples() {
        let answer = json!({"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": {"__name__": "taper_loss", "name": "gpt"},
             "values": [[100, "2.5"], [101, "NaN"], [102, "+Inf"], [103, "2.25"]]},
            {"metric": {}, "values": []},
        ]}});
        let got = parse_matrix(&answer);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].labels["name"], "gpt");
        assert_eq!(got[0].points, vec![(100.0, 2.5), (103.0, 2.25)]);
        assert!(got[1].points.is_empty());
    }
}
