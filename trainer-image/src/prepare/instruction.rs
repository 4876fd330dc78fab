//! Instruction datasets (`format: instruction`): Alpaca records `{instruction, input,
//! output}` validated and normalised, rendered with the Alpaca prompt template, and
//! tokenized with a loss mask that covers the response (and its end-of-text token) only.

use taper_crds::report::DropReason;
use unicode_normalization::UnicodeNormalization;

/// Inputs that mean "no input" in Alpaca-style data (compared case-insensitively, with
/// or without angle brackets).
const PLACEHOLDERS: [&str; 8] = [
    "noinput", "no input", "n/a", "na", "none", "null", "nan", "-",
];

/// One validated record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The task.
    pub instruction: String,
    /// Its context; empty when there is none.
    pub input: String,
    /// The response to learn.
    pub output: String,
}

/// Why a record was not used (the name is its key in `stats.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not an object with string `instruction` and `output` fields.
    Malformed,
    /// The instruction is empty.
    EmptyInstruction,
    /// The output is empty.
    EmptyOutput,
}

impl Reject {
    /// The reason the record is dropped for.
    pub fn reason(self) -> DropReason {
        match self {
            Self::Malformed => DropReason::Malformed,
            Self::EmptyInstruction => DropReason::EmptyInstruction,
            Self::EmptyOutput => DropReason::EmptyOutput,
        }
    }
}

/// NFC, `\r\n` → `\n`, control characters other than newline and tab removed, ends
/// trimmed. Markup and inner whitespace are kept: in code answers they are content.
pub fn normalize_field(s: &str) -> String {
    s.replace("\r\n", "\n")
        .nfc()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .collect::<String>()
        .trim()
        .to_string()
}

/// Whether an input is a placeholder for "no input".
pub fn is_placeholder(input: &str) -> bool {
    let t = input
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_lowercase();
    PLACEHOLDERS.contains(&t.as_str())
}

/// Validate and normalise one record. The second value tells whether a placeholder input
/// was replaced by an empty one.
pub fn parse(record: &serde_json::Value) -> Result<(Record, bool), Reject> {
    let field = |k: &str| record.get(k).and_then(|v| v.as_str());
    let (Some(instruction), Some(output)) = (field("instruction"), field("output")) else {
        return Err(Reject::Malformed);
    };
    let input = match record.get("input") {
        None | Some(serde_json::Value::Null) => "",
        Some(v) => v.as_str().ok_or(Reject::Malformed)?,
    };
    let instruction = normalize_field(instruction);
    let output = normalize_field(output);
    if instruction.is_empty() {
        return Err(Reject::EmptyInstruction);
    }
    if output.is_empty() {
        return Err(Reject::EmptyOutput);
    }
    let placeholder = is_placeholder(input);
    let input = if placeholder {
        String::new()
    } else {
        normalize_field(input)
    };
    Ok((
        Record {
            instruction,
            input,
            output,
        },
        placeholder,
    ))
}

/// The Alpaca prompt (everything before the response).
pub fn alpaca_prompt(r: &Record) -> String {
    if r.input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Response:\n",
            r.instruction
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n",
            r.instruction, r.input
        )
    }
}

/// Tokens and loss mask of one example: prompt, response, end-of-text; the mask is 1 on
/// the response and the end-of-text token (everything when `mask_prompt` is false).
/// Truncated to `max_len` tokens, keeping the end-of-text token last so that examples stay
/// separable; the flag tells whether it was cut.
pub fn encode(
    prompt: &[u32],
    response: &[u32],
    eot: u32,
    mask_prompt: bool,
    max_len: usize,
) -> (Vec<u32>, Vec<u8>, bool) {
    let mut tokens = Vec::with_capacity(prompt.len() + response.len() + 1);
    tokens.extend_from_slice(prompt);
    tokens.extend_from_slice(response);
    tokens.push(eot);
    let mut mask = vec![u8::from(!mask_prompt); prompt.len()];
    mask.resize(tokens.len(), 1);
    let truncated = tokens.len() > max_len;
    if truncated {
        tokens.truncate(max_len.saturating_sub(1));
        mask.truncate(max_len.saturating_sub(1));
        tokens.push(eot);
        mask.push(1);
    }
    (tokens, mask, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_and_normalises_records() {
        let (r, placeholder) =
            parse(&json!({"instruction": " Add. ", "input": "<noinput>", "output": "2\r\n"}))
                .expect("ok");
        assert_eq!(
            r,
            Record {
                instruction: "Add.".into(),
                input: String::new(),
                output: "2".into()
            }
        );
        assert!(placeholder);
        assert!(
            is_placeholder("<No Input>")
                && is_placeholder("N/A")
                && !is_placeholder("none of these")
        );
        assert_eq!(
            parse(&json!({"instruction": "x", "output": "  "})),
            Err(Reject::EmptyOutput)
        );
        assert_eq!(
            parse(&json!({"instruction": "", "output": "y"})),
            Err(Reject::EmptyInstruction)
        );
        assert_eq!(
            parse(&json!({"instruction": 1, "output": "y"})),
            Err(Reject::Malformed)
        );
        assert_eq!(
            parse(&json!(["not", "an", "object"])),
            Err(Reject::Malformed)
        );
    }

    #[test]
    fn renders_both_alpaca_templates() {
        let mut r = Record {
            instruction: "Sum".into(),
            input: String::new(),
            output: "3".into(),
        };
        assert!(alpaca_prompt(&r).ends_with("### Instruction:\nSum\n\n### Response:\n"));
        r.input = "1 2".into();
        assert!(alpaca_prompt(&r).contains("### Input:\n1 2\n\n### Response:\n"));
    }

    #[test]
    fn masks_the_prompt_and_truncates() {
        let (t, m, cut) = encode(&[1, 2, 3], &[4, 5], 9, true, 10);
        assert_eq!(
            (t, m, cut),
            (vec![1, 2, 3, 4, 5, 9], vec![0, 0, 0, 1, 1, 1], false)
        );
        let (t, m, cut) = encode(&[1, 2, 3], &[4, 5], 9, false, 4);
        assert_eq!((t, m, cut), (vec![1, 2, 3, 9], vec![1, 1, 1, 1], true));
    }
}
