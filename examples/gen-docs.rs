//! Generates the man pages and shell completions the Debian package ships
//! (`scripts/package.sh`): detourd(8) and detourctl(8) from the CLI definitions
//! ([`detour::cli`], with clap_mangen), detour.toml(5) from `docs/config.md`, and
//! completions for bash, zsh and fish (clap_complete).
//!
//! Usage: `cargo run --example gen-docs -- OUT_DIR` writes `OUT_DIR/man/*.{8,5}` and
//! `OUT_DIR/completions/{bash,zsh,fish}/*`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("creating the folder");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// One man page for a command, with a section per subcommand.
fn man_page(cmd: clap::Command, section: &str, out: &Path) {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone()).section(section);
    man.render_title(&mut buf).expect("title");
    man.render_name_section(&mut buf).expect("name");
    man.render_synopsis_section(&mut buf).expect("synopsis");
    man.render_description_section(&mut buf).expect("description");
    man.render_options_section(&mut buf).expect("options");
    // Every subcommand in full (clap_mangen's own section lists only their names).
    let subs: Vec<clap::Command> = cmd.get_subcommands().filter(|s| s.get_name() != "help").cloned().collect();
    if !subs.is_empty() {
        buf.extend_from_slice(b".SH COMMANDS\n");
        for sub in subs {
            let bin = format!("{name} {}", sub.get_name());
            let mut sub = sub.bin_name(bin);
            sub.build();
            let _ = writeln!(Text(&mut buf), ".TP\n\\fB{}\\fR", roff_escape(&sub.render_usage().to_string().replace("Usage: ", "")));
            let about = sub.get_long_about().or(sub.get_about()).map(|a| a.to_string()).unwrap_or_default();
            let _ = writeln!(Text(&mut buf), "{}", roff_escape(&about));
            for a in sub.get_arguments().filter(|a| !a.is_hide_set() && a.get_id() != "help") {
                let value = match (a.get_long().is_some() || a.get_short().is_some(), a.get_value_names()) {
                    (true, Some(v)) if a.get_action().takes_values() => format!(" <{}>", v.join(" ")),
                    _ => String::new(),
                };
                let flag = match (a.get_short(), a.get_long()) {
                    (Some(s), Some(l)) => format!("-{s}, --{l}"),
                    (None, Some(l)) => format!("--{l}"),
                    (Some(s), None) => format!("-{s}"),
                    (None, None) => a.get_value_names().map(|v| v.iter().map(|n| format!("<{n}>")).collect::<Vec<_>>().join(" ")).unwrap_or_else(|| a.get_id().to_string()),
                };
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                let _ = writeln!(Text(&mut buf), ".RS\n.TP\n\\fB{}\\fR{}\n{}\n.RE", roff_escape(&flag), roff_escape(&value), roff_escape(&help));
            }
        }
    }
    man.render_version_section(&mut buf).expect("version");
    buf.extend_from_slice(b".SH SEE ALSO\ndetourd(8), detourctl(8), detour.toml(5), /usr/share/doc/detour/\n");
    write(&out.join("man").join(format!("{name}.{section}")), &buf);
}

/// `io::Write` for `write!` into a byte buffer.
struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Escapes text for roff: backslashes, and a leading dot or quote.
fn roff_escape(s: &str) -> String {
    s.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// detour.toml(5) from docs/config.md: headings become sections, fenced blocks verbatim
/// text, paragraphs and list items stay as they are (inline Markdown marks dropped).
fn config_page(md: &str, out: &Path) {
    let mut o = String::from(".TH DETOUR.TOML 5 \"\" \"detour\" \"File Formats\"\n.SH NAME\ndetour.toml \\- configuration of detourd, the detour overlay daemon\n");
    let mut fenced = false;
    for line in md.lines() {
        if line.starts_with("```") {
            o += if fenced { ".fi\n.RE\n" } else { ".RS 2\n.nf\n" };
            fenced = !fenced;
            continue;
        }
        if fenced {
            o += &roff_escape(line);
            o.push('\n');
            continue;
        }
        if line.starts_with("# ") {
            // The page's own title: the NAME section says it.
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            let _ = writeln!(o, ".SH {}", roff_escape(&h.to_uppercase()));
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            let _ = writeln!(o, ".SS {}", roff_escape(h));
            continue;
        }
        if line.trim().is_empty() {
            o += ".PP\n";
            continue;
        }
        let text = line.replace('`', "").replace("**", "");
        let text = match text.trim_start().strip_prefix("* ").or_else(|| text.trim_start().strip_prefix("- ")) {
            Some(item) => format!(".IP \\(bu 2\n{item}"),
            None => text,
        };
        o += &roff_escape(&text);
        o.push('\n');
    }
    o += ".SH SEE ALSO\ndetourd(8), detourctl(8)\n";
    write(&out.join("man").join("detour.toml.5"), o.as_bytes());
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: gen-docs OUT_DIR"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    man_page(detour::cli::detourd::Args::command(), "8", &out);
    man_page(detour::cli::detourctl::Args::command(), "8", &out);
    config_page(&std::fs::read_to_string(root.join("docs/config.md")).expect("docs/config.md"), &out);
    for (shell, dir) in [(Shell::Bash, "bash"), (Shell::Zsh, "zsh"), (Shell::Fish, "fish")] {
        for mut cmd in [detour::cli::detourctl::Args::command(), detour::cli::detourd::Args::command()] {
            let name = cmd.get_name().to_string();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut buf);
            let file = match shell {
                Shell::Bash => name.clone(),
                Shell::Zsh => format!("_{name}"),
                _ => format!("{name}.fish"),
            };
            write(&out.join("completions").join(dir).join(file), &buf);
        }
    }
    println!("man pages and completions in {}", out.display());
}
