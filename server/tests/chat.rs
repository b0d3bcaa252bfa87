//! `purehw chat` end to end through a pseudo-terminal: the real binary, driven by
//! server/tests/chat_pty.py (Python's `pty` module: no new dependency) as a person at a terminal
//! would drive it, Ctrl-C included. The scenario is in the script's docstring. And the KV-cache
//! reuse checked against computing every turn whole.

use std::io::Write;
use std::process::{Command, Stdio};

use purehw_conformance::model_file;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chat_pty.py");

/// `chat -m smollm2-135m --temperature 0 -n N EXTRA...`, on `PUREHW_TEST_BACKEND` if set (as in
/// serve.rs). The model must be in the cache ($PUREHW_MODELS, ...); without it this fails naming
/// the command that fetches it, as the other end-to-end tests do.
fn chat_args(n: &str, extra: &[&str]) -> Vec<String> {
    model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut args: Vec<String> = ["chat", "-m", "smollm2-135m", "--temperature", "0", "-n", n]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    if let Ok(b) = std::env::var("PUREHW_TEST_BACKEND") {
        args.extend(["--backend".to_string(), b]);
    }
    args
}

/// chat_pty.py `[--twice]` on `purehw ARGS`: passes or panics with the script's transcript.
fn pty_scenario(script_args: &[&str], args: &[String]) {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .args(script_args)
        .arg(env!("CARGO_BIN_EXE_purehw"))
        .args(args)
        .output()
        .expect("running python3 (is it installed?)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("$ python3 chat_pty.py {} purehw {}\n{text}", script_args.join(" "), args.join(" "));
    assert!(out.status.success(), "the pty scenario failed:\n{text}");
}

#[test]
fn chat_through_a_terminal() {
    pty_scenario(&[], &chat_args("160", &[]));
}

#[test]
fn ctrl_c_twice_at_the_prompt_leaves() {
    pty_scenario(&["--twice"], &chat_args("16", &[]));
}

/// Lines piped to `purehw chat` (no terminal: no prompts); (stdout, stderr).
fn piped(args: &[String], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_purehw"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting purehw chat");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing to purehw chat");
    let out = child.wait_with_output().expect("waiting for purehw chat");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status.code());
    (stdout, stderr)
}

/// Turns continued from the KV cache give the replies that computing every prompt whole gives
/// (greedy, so token for token), and the cache is really used.
#[test]
fn cached_turns_match_uncached() {
    let input = "What is the capital of France?\nAnd of Germany?\n/clear\nName three fruits.\nAnd three colours?\n";
    let (cached, cached_log) = piped(&chat_args("48", &[]), input);
    let (whole, whole_log) = piped(&chat_args("48", &["--no-prompt-cache"]), input);
    println!("{cached}{cached_log}\n--no-prompt-cache:\n{whole}{whole_log}");
    assert_eq!(cached, whole, "replies differ with and without the prompt cache");
    assert!(cached.contains("Paris") && cached.contains("Berlin"), "{cached}");
    let stats = |log: &str| -> Vec<usize> {
        log.lines().filter_map(|l| l.split_once(" cached)")?.0.rsplit_once('(')?.1.parse().ok()).collect()
    };
    // Turn 1 starts cold; turns 2 and 4 extend the conversation; turn 3 (after /clear) shares the
    // system prompt.
    let reused = stats(&cached_log);
    assert_eq!(reused.len(), 4, "{cached_log}");
    assert!(reused[0] == 0 && reused[1..].iter().all(|&n| n > 0), "{cached_log}");
    assert!(stats(&whole_log).iter().all(|&n| n == 0), "{whole_log}");
}
