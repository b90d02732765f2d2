//! HTML as plain text: ZenTao comments come from a rich-text editor, and a chat wants text.

/// HTML (a ZenTao rich-text comment) as plain text.
pub fn html_to_text(s: &str) -> String {
    let mut text = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(lt) = rest.find('<') {
        text.push_str(&rest[..lt]);
        let after = &rest[lt + 1..];
        let is_tag = after.starts_with(|c: char| c.is_ascii_alphabetic() || "/!?".contains(c));
        if !is_tag {
            // "a < b": text, not markup.
            text.push('<');
            rest = after;
            continue;
        }
        match after.find('>') {
            Some(gt) => {
                if breaks_line(&after[..gt]) {
                    text.push('\n');
                }
                rest = &after[gt + 1..];
            }
            // An unclosed tag, and no '>' further on either: the rest is text. (Searching
            // again for every later '<' would take quadratic time on hostile input.)
            None => {
                text.push('<');
                text.push_str(after);
                rest = "";
                break;
            }
        }
    }
    text.push_str(rest);
    // Entities after tags, so an escaped "&lt;b&gt;" stays visible text.
    let text = decode_entities(&text);
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.trim().lines() {
        let line = line.trim_end();
        blank = if line.is_empty() { blank + 1 } else { 0 };
        // Empty paragraphs are spacing in the editor, noise in a chat.
        if blank < 2 {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.trim_end().to_owned()
}

/// `<br>`, and the end of a block element, end a line.
fn breaks_line(tag: &str) -> bool {
    let (closing, tag) = match tag.strip_prefix('/') {
        Some(t) => (true, t),
        None => (false, tag),
    };
    let name: String = tag
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    name == "br"
        || closing
            && matches!(
                name.as_str(),
                "p" | "div"
                    | "li"
                    | "tr"
                    | "h1"
                    | "h2"
                    | "h3"
                    | "h4"
                    | "h5"
                    | "h6"
                    | "blockquote"
                    | "pre"
                    | "table"
                    | "ul"
                    | "ol"
            )
}

fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        // Entity names are short: look for the ';' only that far, not to the end of the text
        // for every '&'.
        let window = &after.as_bytes()[..after.len().min(11)];
        let decoded = window
            .iter()
            .position(|&b| b == b';')
            .and_then(|semi| entity(&after[..semi]).map(|c| (c, semi)));
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &after[semi + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return match char::from_u32(code)? {
            '\u{a0}' => Some(' '),
            c => Some(c),
        };
    }
    Some(match name {
        // A chat client would keep a no-break space as a visible oddity.
        "nbsp" => ' ',
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "quot" => '"',
        "apos" => '\'',
        "ldquo" => '“',
        "rdquo" => '”',
        "lsquo" => '‘',
        "rsquo" => '’',
        "mdash" => '—',
        "ndash" => '–',
        "hellip" => '…',
        "middot" => '·',
        "times" => '×',
        "yen" => '¥',
        "copy" => '©',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unclosed_tags_and_bare_ampersands_stay_text() {
        // Many of them: each is looked at once, not scanned to the end of the text.
        let hostile = "<a&".repeat(20_000);
        assert_eq!(html_to_text(&hostile), hostile);
        assert_eq!(html_to_text("x<b>y</b> <i &amp"), "xy <i &amp");
    }
}
