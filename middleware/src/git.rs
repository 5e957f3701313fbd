//! What a git smart-HTTP fetch looks like, for limited mode: pure checks,
//! no IO.
//!
//! A fetch is `POST <repository>/git-upload-pack` with git's content type
//! and a body of pkt-lines that only ask for objects: protocol v0/v1
//! (`want`, `have`, `done`, `shallow`, `deepen…`, `filter`, flushes) or
//! protocol v2 (`command=fetch` or `command=ls-refs`, capabilities, then
//! those arguments). Anything else posted to a path that merely ends in
//! `/git-upload-pack` (a paste API, `/upload;/git-upload-pack`, a query
//! that redirects) is not a fetch.

/// The smart-HTTP service a push starts with: never a read.
pub const RECEIVE_PACK: &str = "git-receive-pack";

/// Whether `path` is `<repository>/<endpoint>`: segments of letters,
/// digits and `._~-` (percent-escapes allowed), none empty, `.` or `..`,
/// at least one before the endpoint, and no parameters (`;`).
pub fn is_repository_path(path: &str, endpoint: &str) -> bool {
    let Some(repository) = path
        .strip_suffix(endpoint)
        .and_then(|rest| rest.strip_suffix('/'))
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    !repository.is_empty()
        && repository.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-' | b'%')
                })
        })
}

/// The arguments a fetch may carry, v0 and v2 alike (a line is one of
/// these, then a space or the end).
const FETCH_ARGUMENTS: [&str; 20] = [
    "want",
    "want-ref",
    "have",
    "done",
    "shallow",
    "deepen",
    "deepen-since",
    "deepen-not",
    "deepen-relative",
    "filter",
    "thin-pack",
    "no-progress",
    "include-tag",
    "ofs-delta",
    "sideband-all",
    "packfile-uris",
    "wait-for-done",
    // ls-refs (v2)
    "peel",
    "symrefs",
    "ref-prefix",
];

/// Checks that `body` is a git upload-pack request: well-framed
/// pkt-lines that only ask for refs and objects. The error says what is
/// wrong with it.
pub fn check_upload_pack_request(body: &[u8]) -> Result<(), String> {
    let lines = pkt_lines(body)?;
    let data: Vec<&[u8]> = lines.iter().filter_map(|line| *line).collect();
    let Some(first) = data.first() else {
        return Err("it carries no git request".into());
    };
    if first.starts_with(b"command=") {
        // Protocol v2: command, capabilities, delimiter, arguments.
        let command = trim_newline(first);
        if command != b"command=fetch" && command != b"command=ls-refs" {
            return Err(format!(
                "it asks for {}, not fetch or ls-refs",
                String::from_utf8_lossy(command)
            ));
        }
        let mut in_arguments = false;
        for line in lines.iter().skip(1) {
            match line {
                None => in_arguments = true,
                Some(line) if in_arguments => argument(line)?,
                // Capabilities: `name` or `name=value`, never a command.
                Some(line) => {
                    let name = trim_newline(line);
                    let key = name.split(|b| *b == b'=').next().unwrap_or_default();
                    if key.is_empty()
                        || key == b"command"
                        || !key
                            .iter()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                    {
                        return Err(format!(
                            "{:?} is not a git capability",
                            String::from_utf8_lossy(name)
                        ));
                    }
                }
            }
        }
        return Ok(());
    }
    // Protocol v0/v1: the first want carries capabilities after the id.
    for line in data {
        argument(line)?;
    }
    Ok(())
}

/// One argument line of a fetch.
fn argument(line: &[u8]) -> Result<(), String> {
    let line = trim_newline(line);
    let word = line.split(|b| *b == b' ').next().unwrap_or_default();
    if FETCH_ARGUMENTS
        .iter()
        .any(|allowed| allowed.as_bytes() == word)
    {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a fetch argument",
            String::from_utf8_lossy(&line[..line.len().min(40)])
        ))
    }
}

fn trim_newline(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// Splits a body into pkt-lines: `Some(data)`, or `None` for the special
/// packets (flush `0000`, delimiter `0001`, response end `0002`). Every byte
/// must be framed.
fn pkt_lines(mut body: &[u8]) -> Result<Vec<Option<&[u8]>>, String> {
    let mut lines = Vec::new();
    while !body.is_empty() {
        let (length, rest) = body
            .split_at_checked(4)
            .ok_or_else(|| "it ends inside a pkt-line length".to_owned())?;
        let length = std::str::from_utf8(length)
            .ok()
            .filter(|text| text.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|text| usize::from_str_radix(text, 16).ok())
            .ok_or_else(|| "it is not made of git pkt-lines".to_owned())?;
        match length {
            0..=2 => {
                lines.push(None);
                body = rest;
            }
            3 => return Err("it has a pkt-line of length 3".into()),
            _ => {
                let (data, rest) = rest
                    .split_at_checked(length - 4)
                    .ok_or_else(|| "a pkt-line is longer than the body".to_owned())?;
                lines.push(Some(data));
                body = rest;
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(lines: &[&str]) -> Vec<u8> {
        let mut body = Vec::new();
        for line in lines {
            match *line {
                "0000" | "0001" => body.extend_from_slice(line.as_bytes()),
                _ => body.extend_from_slice(format!("{:04x}{line}", line.len() + 4).as_bytes()),
            }
        }
        body
    }

    const OID: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn fetches_of_both_protocols_pass() {
        let v0 = pkt(&[
            &format!(
                "want {OID} multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.47\n"
            ),
            &format!("want {OID}\n"),
            "deepen 1\n",
            "0000",
            &format!("have {OID}\n"),
            "done\n",
        ]);
        assert_eq!(check_upload_pack_request(&v0), Ok(()));
        let v2 = pkt(&[
            "command=fetch",
            "agent=git/2.47.3",
            "object-format=sha1",
            "0001",
            "thin-pack",
            "ofs-delta",
            &format!("want {OID}\n"),
            "done\n",
            "0000",
        ]);
        assert_eq!(check_upload_pack_request(&v2), Ok(()));
        let ls_refs = pkt(&[
            "command=ls-refs\n",
            "agent=git/2.47.3\n",
            "0001",
            "peel\n",
            "symrefs\n",
            "ref-prefix refs/heads/\n",
            "0000",
        ]);
        assert_eq!(check_upload_pack_request(&ls_refs), Ok(()));
    }

    #[test]
    fn anything_else_is_not_a_fetch() {
        for body in [
            b"".to_vec(),
            b"content=my+paste".to_vec(),
            b"{\"text\": \"hello\"}".to_vec(),
            pkt(&["command=push\n", "0001", "0000"]),
            pkt(&[
                "command=fetch\n",
                "0001",
                "delete refs/heads/main\n",
                "0000",
            ]),
            pkt(&["command=fetch\n", "command=ls-refs\n", "0001", "0000"]),
            pkt(&[&format!("want {OID}\n"), "0000", "upload this\n"]),
            // Framing: a short tail, a bad length, a line past the end.
            [pkt(&[&format!("want {OID}\n")]), b"00".to_vec()].concat(),
            b"0003".to_vec(),
            b"00ffwant".to_vec(),
            [pkt(&[&format!("want {OID}\n")]), b"trailing bytes".to_vec()].concat(),
        ] {
            assert!(
                check_upload_pack_request(&body).is_err(),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn repository_paths() {
        for path in [
            "/owner/repo.git/git-upload-pack",
            "/owner/repo/git-upload-pack",
            "/git/group/sub%20group/repo.git/git-upload-pack",
        ] {
            assert!(is_repository_path(path, "git-upload-pack"), "{path}");
        }
        for path in [
            "/git-upload-pack",
            "/upload;/git-upload-pack",
            "//git-upload-pack",
            "/a//b/git-upload-pack",
            "/a/../b/git-upload-pack",
            "/a/./git-upload-pack",
            "/a/git-upload-packx",
            "/a/xgit-upload-pack",
            "/a/b:c/git-upload-pack",
        ] {
            assert!(!is_repository_path(path, "git-upload-pack"), "{path}");
        }
    }
}
