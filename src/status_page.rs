//! The status page's HTML, shared by the gateway (`gateway::status`) and the PIN server (`server::status`): one
//! self-contained document in the manner of HAProxy's stats page — inline CSS, no script, no external asset, and
//! a `<meta http-equiv="refresh">` so that an open tab stays current. Every value goes through [`escape`]; what a
//! page shows is chosen by its caller, which never hands it a PIN, a key or a MAC.

use std::fmt::Write as _;

/// Seconds between the browser's reloads of the page.
pub const REFRESH_SECS: u32 = 5;

/// `s` as HTML text or attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How a cell or fact is coloured: normal, good (green), needing a look (amber), or wrong (red).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tone {
    #[default]
    Plain,
    Good,
    Warn,
    Bad,
}

impl Tone {
    fn class(self) -> &'static str {
        match self {
            Tone::Plain => "",
            Tone::Good => " class=\"good\"",
            Tone::Warn => " class=\"warn\"",
            Tone::Bad => " class=\"bad\"",
        }
    }
}

/// One table cell: text (escaped when written), right-aligned if a number, and an optional fill bar (0 to 1).
#[derive(Clone, Debug, Default)]
pub struct Cell {
    text: String,
    tone: Tone,
    number: bool,
    bar: Option<f64>,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell {
            text: s.into(),
            ..Cell::default()
        }
    }

    pub fn num(v: impl std::fmt::Display) -> Cell {
        Cell {
            text: v.to_string(),
            number: true,
            ..Cell::default()
        }
    }

    pub fn tone(mut self, tone: Tone) -> Cell {
        self.tone = tone;
        self
    }

    /// A bar filled to `fraction` (clamped to 0..1) behind the text.
    pub fn bar(mut self, fraction: f64) -> Cell {
        self.bar = Some(if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        });
        self
    }
}

const STYLE: &str = "\
body{font:13px/1.35 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2228}\
header{background:#243447;color:#fff;padding:10px 16px}header h1{margin:0;font-size:18px}\
header p{margin:2px 0 0;color:#c9d3de;font-size:12px}main{padding:8px 16px 24px}\
h2{font-size:14px;margin:18px 0 6px;color:#243447;border-bottom:2px solid #243447;padding-bottom:2px}\
.facts{display:flex;flex-wrap:wrap;gap:6px}.fact{background:#fff;border:1px solid #d5dae0;border-radius:3px;\
padding:4px 10px;min-width:90px}.fact b{display:block;font-size:16px}.fact span{color:#5b6773;font-size:11px}\
table{border-collapse:collapse;background:#fff;min-width:50%}th{background:#dfe5ec;text-align:left;\
padding:3px 8px;font-weight:600;font-size:12px;border:1px solid #c5ced8}td{padding:3px 8px;border:1px solid #d5dae0;\
position:relative}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.good{background:#d8f0d8}.warn{background:#fbe9c2}.bad{background:#f6c9c6}\
.fact.good b{color:#1e6b1e}.fact.warn b{color:#8a5a00}.fact.bad b{color:#a11d14}\
.bar{position:absolute;left:0;top:0;bottom:0;background:#9cc3e6;opacity:.55;z-index:0}td span{position:relative;z-index:1}\
p.note{color:#5b6773;font-size:12px;margin:4px 0}";

/// A page being written.
pub struct Page {
    out: String,
}

impl Page {
    /// The head of the page: `title`, and under it `subtitle` (both escaped) and when the page was made (UTC).
    pub fn new(title: &str, subtitle: &str) -> Page {
        let now = time::OffsetDateTime::now_utc();
        let at = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let (title, subtitle) = (escape(title), escape(subtitle));
        let mut out = String::with_capacity(16 * 1024);
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
             <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title><style>{STYLE}</style></head>\
             <body><header><h1>{title}</h1><p>{subtitle} · {at} · refreshes every {REFRESH_SECS} s</p></header><main>"
        );
        Page { out }
    }

    /// A section heading.
    pub fn section(&mut self, title: &str) -> &mut Page {
        let _ = write!(self.out, "<h2>{}</h2>", escape(title));
        self
    }

    /// A row of boxes, each a value over its label.
    pub fn facts(&mut self, facts: &[(&str, String, Tone)]) -> &mut Page {
        self.out.push_str("<div class=\"facts\">");
        for (label, value, tone) in facts {
            let class = match tone {
                Tone::Plain => "fact",
                Tone::Good => "fact good",
                Tone::Warn => "fact warn",
                Tone::Bad => "fact bad",
            };
            let _ = write!(
                self.out,
                "<div class=\"{class}\"><b>{}</b><span>{}</span></div>",
                escape(value),
                escape(label)
            );
        }
        self.out.push_str("</div>");
        self
    }

    /// A table; `empty` is said instead when there is no row.
    pub fn table(&mut self, headers: &[&str], rows: &[Vec<Cell>], empty: &str) -> &mut Page {
        if rows.is_empty() {
            return self.note(empty);
        }
        self.out.push_str("<table><tr>");
        for h in headers {
            let _ = write!(self.out, "<th>{}</th>", escape(h));
        }
        self.out.push_str("</tr>");
        for row in rows {
            self.out.push_str("<tr>");
            for c in row {
                let class = match (c.number, c.tone) {
                    (true, Tone::Plain) => " class=\"n\"".to_string(),
                    (true, t) => t.class().replace("class=\"", "class=\"n "),
                    (false, t) => t.class().to_string(),
                };
                let bar = c
                    .bar
                    .map(|f| format!("<div class=\"bar\" style=\"width:{:.0}%\"></div>", f * 100.0))
                    .unwrap_or_default();
                let _ = write!(self.out, "<td{class}>{bar}<span>{}</span></td>", escape(&c.text));
            }
            self.out.push_str("</tr>");
        }
        self.out.push_str("</table>");
        self
    }

    /// A line of explanation under a table.
    pub fn note(&mut self, text: &str) -> &mut Page {
        let _ = write!(self.out, "<p class=\"note\">{}</p>", escape(text));
        self
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("</main></body></html>\n");
        self.out
    }
}

/// A duration in seconds, short: `42 s`, `5 min`, `3.2 h`, `2.1 d`.
pub fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{:.1} h", secs as f64 / 3600.0),
        _ => format!("{:.1} d", secs as f64 / 86_400.0),
    }
}

/// `part` of `whole` as a percentage with one decimal, or `–` when `whole` is 0.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".into()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_escaped_and_the_page_stands_alone() {
        let mut p = Page::new("t<i>tle", "a & b");
        p.section("<script>")
            .facts(&[("l\"abel", "<v>".into(), Tone::Bad)])
            .table(
                &["h<1>"],
                &[vec![
                    Cell::text("<img src=x onerror=alert(1)>").bar(0.5),
                    Cell::num(3).tone(Tone::Warn),
                ]],
                "none",
            )
            .note("it's");
        let html = p.finish();
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            !html.contains("<v>") && !html.contains("<i>") && !html.contains("<1>"),
            "{html}"
        );
        for want in [
            "t&lt;i&gt;tle",
            "a &amp; b",
            "&lt;img src=x onerror=alert(1)&gt;",
            "it&#39;s",
            "l&quot;abel",
        ] {
            assert!(html.contains(want), "{want} in {html}");
        }
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(html.contains("class=\"n warn\""), "{html}");
        // Nothing fetched from elsewhere.
        assert!(
            !html.contains("src=\"") && !html.contains("href=") && !html.contains("url("),
            "{html}"
        );
    }

    #[test]
    fn ages_and_percentages() {
        assert_eq!(age(5), "5 s");
        assert_eq!(age(600), "10 min");
        assert_eq!(age(3 * 3600), "3.0 h");
        assert_eq!(age(3 * 86_400), "3.0 d");
        assert_eq!(percent(1, 4), "25.0 %");
        assert_eq!(percent(1, 0), "–");
    }
}
