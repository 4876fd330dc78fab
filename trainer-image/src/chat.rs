//! `taper chat`: talk to a model. On a terminal it is a REPL with line editing and
//! history (↑/↓, Ctrl-R), a clear prompt, answers streamed as they are produced, and
//! Ctrl-D to leave (Ctrl-C drops the line being typed). Over a pipe it reads one question a
//! line and writes one answer a line, so scripts and tests can use it.
//!
//! Each question is asked on its own (no earlier turns in the prompt), wrapped in the
//! instruction template the model was finetuned with.

use std::io::{BufRead, IsTerminal, Write};

use crate::{
    generate::{Generator, SampleOptions, instruction_prompt},
    job::JobError,
};

/// How a question becomes a prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// The Alpaca instruction template (what `taper prepare` renders instruction data with).
    #[default]
    Alpaca,
    /// The text as it is (a pretrained model continues it).
    None,
}

impl Template {
    /// The prompt for `text`.
    pub fn apply(self, text: &str) -> String {
        match self {
            Self::Alpaca => instruction_prompt(text),
            Self::None => text.to_string(),
        }
    }
}

/// Answer `question`, writing the answer's pieces to `out` as they come.
fn answer(
    generator: &Generator,
    question: &str,
    template: Template,
    opts: &SampleOptions,
    out: &mut dyn Write,
) -> Result<String, JobError> {
    let mut failed = None;
    let mut shown = false;
    let text = generator.stream(&template.apply(question), opts, &mut |piece| {
        shown = true;
        if failed.is_none()
            && let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush())
        {
            failed = Some(e);
        }
    })?;
    // A decoder that rewrote earlier text stops the stream; the answer is shown whole.
    if failed.is_none()
        && !shown
        && let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
    {
        failed = Some(e);
    }
    match failed {
        Some(e) => Err(JobError::Internal(format!("writing the answer: {e}"))),
        None => Ok(text),
    }
}

/// Run the chat on stdin/stdout (see the module's comment).
pub fn run(
    generator: &Generator,
    template: Template,
    opts: &SampleOptions,
    name: &str,
) -> Result<(), JobError> {
    let stdout = std::io::stdout();
    if !std::io::stdin().is_terminal() {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| JobError::Internal(format!("reading stdin: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let mut out = stdout.lock();
            // One answer a line: newlines inside an answer become spaces.
            let text = answer(generator, &line, template, opts, &mut std::io::sink())?;
            writeln!(out, "{}", text.trim().replace('\n', " "))
                .map_err(|e| JobError::Internal(e.to_string()))?;
        }
        return Ok(());
    }
    let mut editor = rustyline::DefaultEditor::new()
        .map_err(|e| JobError::Internal(format!("terminal: {e}")))?;
    println!(
        "Chatting with {name}. Ask a question and press Enter; ↑/↓ recall earlier ones, Ctrl-D leaves.\n"
    );
    let mut opts = opts.clone();
    loop {
        match editor.readline("you › ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                print!("model › ");
                let mut out = stdout.lock();
                answer(generator, line, template, &opts, &mut out)?;
                writeln!(out, "\n").map_err(|e| JobError::Internal(e.to_string()))?;
                // A fresh draw for the next question, reproducible from the seed.
                opts.seed = opts.seed.wrapping_add(1);
            }
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => {
                println!("Bye.");
                return Ok(());
            }
            Err(e) => return Err(JobError::Internal(format!("terminal: {e}"))),
        }
    }
}
