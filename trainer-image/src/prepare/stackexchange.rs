//! StackExchange `Posts.xml` dumps: each question becomes one document, its title and
//! body followed by its answers (highest score first), with `Score` as the quality field
//! (a question below the threshold drops its thread; an answer below it is left out).
//! Bodies stay HTML here; the cleaning stage turns them into text.

use std::{collections::HashMap, io::BufRead};

use quick_xml::{Reader, events::Event};

/// One question thread.
#[derive(Clone, Debug, PartialEq)]
pub struct Thread {
    /// The question's `Id`.
    pub id: u64,
    /// Title, question body and answers, separated by blank lines.
    pub text: String,
    /// The question's score is below the threshold.
    pub below_threshold: bool,
}

/// The threads of a dump, in question order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Threads {
    /// One per question.
    pub threads: Vec<Thread>,
    /// Rows without the attributes a question or answer needs.
    pub malformed: u64,
    /// Answers left out for their score.
    pub answers_below_threshold: u64,
}

struct Post {
    id: u64,
    score: i64,
    title: String,
    body: String,
}

/// Parse a `Posts.xml` (a UTF-8 byte-order mark and CRLF line ends are fine).
pub fn read_threads<R: BufRead>(mut input: R, minimum: Option<f64>) -> Result<Threads, String> {
    // Skip a byte-order mark.
    if input
        .fill_buf()
        .map_err(|e| e.to_string())?
        .starts_with(&[0xEF, 0xBB, 0xBF])
    {
        input.consume(3);
    }
    let mut reader = Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut questions: Vec<Post> = Vec::new();
    let mut answers: HashMap<u64, Vec<Post>> = HashMap::new();
    let mut out = Threads::default();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Eof) => break,
            Ok(Event::Empty(e) | Event::Start(e)) if e.name().as_ref() == b"row" => {
                let mut attrs: HashMap<Vec<u8>, String> = HashMap::new();
                for a in e.attributes().flatten() {
                    let value = a
                        .unescape_value()
                        .map(|v| v.into_owned())
                        .unwrap_or_else(|_| String::from_utf8_lossy(&a.value).into_owned());
                    attrs.insert(a.key.as_ref().to_vec(), value);
                }
                let num = |k: &[u8]| attrs.get(k).and_then(|v| v.trim().parse::<i64>().ok());
                let (Some(kind), Some(id)) = (num(b"PostTypeId"), num(b"Id")) else {
                    out.malformed += 1;
                    continue;
                };
                let post = Post {
                    id: id as u64,
                    score: num(b"Score").unwrap_or(0),
                    title: attrs.get(b"Title".as_slice()).cloned().unwrap_or_default(),
                    body: attrs.get(b"Body".as_slice()).cloned().unwrap_or_default(),
                };
                match kind {
                    1 => questions.push(post),
                    2 => match num(b"ParentId") {
                        Some(parent) => answers.entry(parent as u64).or_default().push(post),
                        None => out.malformed += 1,
                    },
                    _ => {} // tag wikis and other post types are not documents
                }
            }
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "XML error at byte {}: {e}",
                    reader.buffer_position()
                ));
            }
        }
        buf.clear();
    }
    let below = |score: i64| minimum.is_some_and(|m| (score as f64) < m);
    for q in questions {
        let mut text = format!("{}\n\n{}", q.title.trim(), q.body.trim());
        let mut replies = answers.remove(&q.id).unwrap_or_default();
        replies.sort_by_key(|a| (std::cmp::Reverse(a.score), a.id));
        for a in replies {
            if below(a.score) {
                out.answers_below_threshold += 1;
                continue;
            }
            text.push_str("\n\n");
            text.push_str(a.body.trim());
        }
        out.threads.push(Thread {
            id: q.id,
            text,
            below_threshold: below(q.score),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_questions_with_answers_best_first() {
        let xml = "\u{FEFF}<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<posts>\r\n\
  <row Id=\"1\" PostTypeId=\"1\" Score=\"5\" Title=\"Hops?\" Body=\"&lt;p&gt;What are hops?&lt;/p&gt;\" />\r\n\
  <row Id=\"2\" PostTypeId=\"2\" ParentId=\"1\" Score=\"1\" Body=\"&lt;p&gt;Low.&lt;/p&gt;\" />\r\n\
  <row Id=\"3\" PostTypeId=\"2\" ParentId=\"1\" Score=\"9\" Body=\"&lt;p&gt;High.&lt;/p&gt;\" />\r\n\
  <row Id=\"4\" PostTypeId=\"1\" Score=\"-2\" Title=\"Bad\" Body=\"x\" />\r\n\
  <row Id=\"5\" PostTypeId=\"4\" Score=\"0\" Body=\"tag wiki\" />\r\n\
  <row PostTypeId=\"1\" />\r\n</posts>\r\n";
        let t = read_threads(xml.as_bytes(), Some(0.0)).expect("parse");
        assert_eq!(t.threads.len(), 2);
        assert_eq!(
            t.threads[0].text,
            "Hops?\n\n<p>What are hops?</p>\n\n<p>High.</p>\n\n<p>Low.</p>"
        );
        assert!(!t.threads[0].below_threshold);
        assert!(t.threads[1].below_threshold);
        assert_eq!(t.malformed, 1);
    }
}
