//! Docker-shaped output for scripts: `--format json` on ls/ps/inspect, RFC 3339 times.

use netpath_tests::Lab;
use serde_json::Value;

/// Each line of `out` as JSON.
fn lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// `2026-11-25T22:31:41Z`: what Docker prints (and Go's time.Parse(RFC3339) reads).
fn is_rfc3339(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    let b = s.as_bytes();
    s.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 14
}

#[test]
fn format_json_prints_one_object_per_line_and_times_are_rfc3339() {
    let lab = Lab::new("format");
    lab.np(&["network", "create", "--subnet", "10.99.0.0/24", "n"]);
    let ext = lab.add_ns("ext");
    lab.np(&["attach", "--netns", ext.to_str().unwrap(), "--name", "x", "--network", "n"]);

    let nets = lines(&lab.np(&["network", "ls", "--format", "json"]));
    assert!(nets.iter().any(|n| n["Name"] == "n"), "{nets:?}");
    let n = lines(&lab.np(&["network", "inspect", "--format", "json", "n"]));
    assert_eq!(n.len(), 1);
    assert!(is_rfc3339(&n[0]["Created"]), "{}", n[0]["Created"]);
    assert!(is_rfc3339(&lab.inspect_network("n")["Created"]), "the default output too");

    let ps = lines(&lab.np(&["ps", "-a", "--format", "{{json .}}"]));
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["Name"], "x");
    assert!(is_rfc3339(&ps[0]["Created"]));
    let c = lines(&lab.np(&["inspect", "--format", "json", "x"]));
    assert_eq!(c[0]["Name"], "x");
    assert!(is_rfc3339(&c[0]["Created"]));

    let err = lab.np_fails(&["ps", "--format", "{{.Names}}"]);
    assert!(err.contains("unsupported format"), "{err}");
}
