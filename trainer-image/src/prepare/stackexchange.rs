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

/// Where and why a dump broke off before its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenOff {
    /// Byte offset in the file (its byte-order mark included) of the markup that broke,
    /// or of the end of a file that ends inside an element.
    pub byte_offset: u64,
    /// What broke.
    pub error: String,
}

/// The threads of a dump, in question order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Threads {
    /// One per question.
    pub threads: Vec<Thread>,
    /// Rows without the attributes a question or answer needs, or with an attribute that
    /// is not UTF-8.
    pub malformed: u64,
    /// Byte offset of the first malformed row.
    pub first_malformed_at: Option<u64>,
    /// Answers left out for their score.
    pub answers_below_threshold: u64,
    /// The dump broke off (an XML error, a read error, or the end of the file inside an
    /// element): the threads are those of the rows before the break.
    pub broken: Option<BrokenOff>,
}

struct Post {
    id: u64,
    score: i64,
    title: String,
    body: String,
}

/// One `<row>`: a question, an answer (kept by the question's id), another post type
/// (ignored), or a malformed row (counted).
fn row(
    e: &quick_xml::events::BytesStart,
    row_start: u64,
    out: &mut Threads,
    questions: &mut Vec<Post>,
    answers: &mut HashMap<u64, Vec<Post>>,
) {
    let mut malformed = || {
        out.malformed += 1;
        out.first_malformed_at.get_or_insert(row_start);
    };
    let mut attrs: HashMap<Vec<u8>, String> = HashMap::new();
    for a in e.attributes().flatten() {
        if std::str::from_utf8(&a.value).is_err() {
            return malformed();
        }
        let value = a
            .unescape_value()
            .map(|v| v.into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(&a.value).into_owned());
        attrs.insert(a.key.as_ref().to_vec(), value);
    }
    let num = |k: &[u8]| attrs.get(k).and_then(|v| v.trim().parse::<i64>().ok());
    let (Some(kind), Some(id)) = (num(b"PostTypeId"), num(b"Id")) else {
        return malformed();
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
            None => malformed(),
        },
        _ => {} // tag wikis and other post types are not documents
    }
}

/// Parse a `Posts.xml` (a UTF-8 byte-order mark and CRLF line ends are fine). A row with
/// an attribute that is not UTF-8 is malformed; a dump that breaks off (an XML error, a
/// read error, the end of the file before `</posts>`) keeps the rows before the break and
/// says where in [`Threads::broken`]. Nesting is counted, not recursed into.
pub fn read_threads<R: BufRead>(mut input: R, minimum: Option<f64>) -> Threads {
    let mut out = Threads::default();
    // Skip a byte-order mark.
    let bom = match input.fill_buf() {
        Ok(head) => head.starts_with(&[0xEF, 0xBB, 0xBF]),
        Err(e) => {
            out.broken = Some(BrokenOff {
                byte_offset: 0,
                error: e.to_string(),
            });
            return out;
        }
    };
    let skipped = if bom {
        input.consume(3);
        3
    } else {
        0
    };
    let mut reader = Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut questions: Vec<Post> = Vec::new();
    let mut answers: HashMap<u64, Vec<Post>> = HashMap::new();
    let mut open_elements = 0u64;
    loop {
        let row_start = reader.buffer_position() + skipped;
        match reader.read_event_into(&mut buf) {
            Ok(Event::Eof) => {
                if open_elements > 0 {
                    out.broken = Some(BrokenOff {
                        byte_offset: reader.buffer_position() + skipped,
                        error: format!(
                            "the file ends inside {open_elements} open element(s) (truncated?)"
                        ),
                    });
                }
                break;
            }
            Ok(Event::Start(e)) => {
                open_elements += 1;
                if e.name().as_ref() == b"row" {
                    row(&e, row_start, &mut out, &mut questions, &mut answers);
                }
            }
            Ok(Event::Empty(e)) => {
                if e.name().as_ref() == b"row" {
                    row(&e, row_start, &mut out, &mut questions, &mut answers);
                }
            }
            Ok(Event::End(_)) => open_elements = open_elements.saturating_sub(1),
            Ok(_) => {}
            Err(e) => {
                out.broken = Some(BrokenOff {
                    byte_offset: reader.error_position() + skipped,
                    error: format!("XML error: {e}"),
                });
                break;
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
    out
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
        let t = read_threads(xml.as_bytes(), Some(0.0));
        assert_eq!(t.broken, None);
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
