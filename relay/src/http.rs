//! The little HTTP/1.1 the relay speaks: read one bounded request head, answer it, close.
//!
//! Only what one port needs: routing to the WebSocket upgrade, `/healthz`, `/metrics`
//! and static files. No keep-alive, no request bodies.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest accepted request head (request line + headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 64;
/// Largest static file served.
pub const MAX_STATIC_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, without `?`.
    pub query: Option<String>,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether header `name` contains `token` in its comma-separated list
    /// (case-insensitive), e.g. `Connection: keep-alive, Upgrade`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Why a request head could not be read. Every variant but [`HeadError::Eof`] and
/// [`HeadError::Io`] is the client's fault and is answered with a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The peer closed before sending a whole head.
    #[error("connection closed before the request head was complete")]
    Eof,
    /// The head exceeds [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    #[error("request head too large")]
    TooLarge,
    /// A line ends in a bare LF instead of CRLF. Proxies disagree on where such a line
    /// ends, which is how requests are smuggled past them, so it is refused outright.
    #[error("malformed request: bare LF line ending")]
    BareLf,
    /// The HTTP/1.x grammar was violated (as `httparse` reads it).
    #[error("malformed request: {0}")]
    Syntax(httparse::Error),
    /// Well-formed HTTP the relay does not accept (e.g. a target not starting with `/`).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one request head. Returns it and the bytes read past its end (which belong
/// to the next protocol, e.g. early WebSocket frames).
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Request, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf[scan_from..], b"\r\n\r\n").map(|i| i + scan_from + 4) {
            let rest = buf.split_off(end);
            return Ok((parse_head(&buf)?, rest));
        }
        // Checked as bytes arrive: a bare-LF request never sends the CRLFCRLF we wait for.
        if has_bare_lf(&buf[scan_from..], scan_from > 0 && buf.get(scan_from - 1) == Some(&b'\r')) {
            return Err(HeadError::BareLf);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `bytes` holds an LF not preceded by CR (`after_cr`: the byte before `bytes`
/// was a CR).
fn has_bare_lf(bytes: &[u8], after_cr: bool) -> bool {
    let mut prev_cr = after_cr;
    for &b in bytes {
        if b == b'\n' && !prev_cr {
            return true;
        }
        prev_cr = b == b'\r';
    }
    false
}

/// Parses a complete head (request line, headers, the empty line ending in CRLF).
pub fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    if has_bare_lf(head, false) {
        return Err(HeadError::BareLf);
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Syntax(e)),
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HeadError::Malformed("bad method"));
    }
    if !target.starts_with('/') {
        return Err(HeadError::Malformed("target must start with /"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let value =
            std::str::from_utf8(h.value).map_err(|_| HeadError::Malformed("header value not UTF-8"))?;
        headers.push((h.name.to_string(), value.trim().to_string()));
    }
    Ok(Request { method: method.to_string(), path: path.to_string(), query, headers })
}

/// Why a percent-encoded string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A `%` not followed by two hex digits.
    #[error("`%` must be followed by two hex digits")]
    BadEscape,
    /// The decoded bytes are not UTF-8.
    #[error("not UTF-8 once percent-decoded")]
    NotUtf8,
}

/// Percent-decodes `s` strictly: a stray `%` or bytes that are not UTF-8 once decoded
/// are errors, not passed through, so two readers never disagree on what a path means.
pub fn percent_decode(s: &str) -> Result<String, DecodeError> {
    let b = s.as_bytes();
    let well_formed = b.iter().enumerate().filter(|(_, &c)| c == b'%').all(|(i, _)| {
        matches!((b.get(i + 1), b.get(i + 2)), (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit())
    });
    if !well_formed {
        return Err(DecodeError::BadEscape);
    }
    percent_encoding::percent_decode(b)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| DecodeError::NotUtf8)
}

/// The value of the first `name=value` pair of a query string (form encoding: `+` is a
/// space, then percent-decoding), `Ok(None)` when there is none.
pub fn query_value(query: Option<&str>, name: &str) -> Result<Option<String>, DecodeError> {
    let Some(query) = query else { return Ok(None) };
    let Some(raw) =
        query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
    else {
        return Ok(None);
    };
    percent_decode(&raw.replace('+', " ")).map(Some)
}

/// [`query_value`] for routes that treat a missing and an undecodable parameter alike.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query_value(query, name).ok().flatten()
}

/// The credential of an `Authorization: Bearer <credential>` header, if the request has one.
pub fn bearer(req: &Request) -> Option<&str> {
    let value = req.header("Authorization")?;
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

/// A response: status, content type, body. Always sent with `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `body`.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response { status, headers: Vec::new(), content_type, body: body.into() }
    }

    /// A plain-text error response.
    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Writes the response. With `head_only` (a `HEAD` request) the body is left out.
    pub async fn write_to<S: AsyncWrite + Unpin>(&self, stream: &mut S, head_only: bool) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(&self.body).await?;
        }
        stream.flush().await
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        301 => "Moved Permanently",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Content type by file extension.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("json" | "map") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Maps a URL path to a file under `root`, or `None` if it is not a safe path: `..`,
/// backslashes, NUL, drive prefixes and percent-encoded separators or dots are refused
/// outright. `/` and paths ending in `/` map to `index.html`.
pub fn static_path(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(url_path).ok()?;
    if decoded.contains('\\') || decoded.contains('\0') {
        return None;
    }
    let mut rel = PathBuf::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => continue,
            ".." => return None,
            s => {
                let p = Path::new(s);
                if p.components().count() != 1 || !matches!(p.components().next(), Some(Component::Normal(_)))
                {
                    return None;
                }
                rel.push(s);
            }
        }
    }
    if decoded.ends_with('/') || rel.as_os_str().is_empty() {
        rel.push("index.html");
    }
    Some(root.join(rel))
}

/// Serves `url_path` from `root`.
pub async fn serve_static(root: &Path, url_path: &str) -> Response {
    let Some(path) = static_path(root, url_path) else {
        return Response::text(400, "bad path");
    };
    // Symlinks must not lead out of the root either.
    let (Ok(root), Ok(real)) = (tokio::fs::canonicalize(root).await, tokio::fs::canonicalize(&path).await)
    else {
        return Response::text(404, "not found");
    };
    if !real.starts_with(&root) {
        return Response::text(404, "not found");
    }
    let real = match tokio::fs::metadata(&real).await {
        Ok(m) if m.is_dir() && !url_path.ends_with('/') => {
            // So that relative links in the directory's index.html resolve.
            return Response::text(301, "moved").with_header("Location", format!("{url_path}/"));
        }
        Ok(m) if m.is_dir() => real.join("index.html"),
        Ok(m) if m.len() > MAX_STATIC_FILE_BYTES => return Response::text(413, "file too large"),
        Ok(_) => real,
        Err(_) => return Response::text(404, "not found"),
    };
    match tokio::fs::read(&real).await {
        Ok(body) => Response::new(200, content_type(&real), body).with_header("Cache-Control", "no-cache"),
        Err(_) => Response::text(404, "not found"),
    }
}

/// A stream that first yields bytes already read (past a request head), then the
/// inner stream. Writes go straight to the inner stream.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`, replaying `prefix` first.
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { prefix, pos: 0, inner }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_websocket_upgrade() {
        let head = b"GET /sync?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n";
        let r = parse_head(head).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/sync");
        assert_eq!(r.query.as_deref(), Some("token=abc"));
        assert_eq!(r.header("upgrade"), Some("websocket"));
        assert!(r.header_has_token("connection", "upgrade"));
    }

    #[test]
    fn rejects_malformed_heads() {
        assert!(parse_head(b"GARBAGE\r\n\r\n").is_err());
        assert!(parse_head(b"GET /x SPDY/3\r\n\r\n").is_err());
        assert!(parse_head(b"GET x HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"GET /x HTTP/1.1\r\nNoColon\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn read_head_keeps_the_bytes_after_the_head() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nEXTRA";
        let (req, rest) = read_head(&mut input).await.unwrap();
        assert_eq!(req.path, "/");
        assert_eq!(rest, b"EXTRA");
        let mut prefixed = Prefixed::new(rest, &b"MORE"[..]);
        let mut all = Vec::new();
        prefixed.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"EXTRAMORE");
    }

    #[tokio::test]
    async fn read_head_is_bounded() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        let mut input = big.as_bytes();
        assert!(matches!(read_head(&mut input).await, Err(HeadError::TooLarge)));
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(read_head(&mut input).await, Err(HeadError::Eof)));
    }

    #[test]
    fn static_paths_stay_inside_the_root() {
        let root = Path::new("/srv/web");
        assert_eq!(static_path(root, "/"), Some(root.join("index.html")));
        assert_eq!(static_path(root, "/a/b.js"), Some(root.join("a/b.js")));
        assert_eq!(static_path(root, "/a/"), Some(root.join("a/index.html")));
        assert_eq!(static_path(root, "/a%20b.css"), Some(root.join("a b.css")));
        for bad in
            ["/../etc/passwd", "/a/../../x", "/%2e%2e/x", "/a%2f..%2f..%2fx", "/a\\..\\x", "/%00", "/%zz"]
        {
            assert_eq!(static_path(root, bad), None, "{bad}");
        }
    }

    #[test]
    fn content_types_cover_the_demo() {
        assert_eq!(content_type(Path::new("a.wasm")), "application/wasm");
        assert_eq!(content_type(Path::new("a.mjs")), "text/javascript; charset=utf-8");
        assert_eq!(content_type(Path::new("a.SVG")), "image/svg+xml");
    }

    #[test]
    fn bare_lf_line_endings_are_refused() {
        assert!(matches!(parse_head(b"GET / HTTP/1.1\nHost: x\r\n\r\n"), Err(HeadError::BareLf)));
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost: x\n\r\n"), Err(HeadError::BareLf)));
    }

    #[tokio::test]
    async fn a_bare_lf_request_is_refused_without_waiting_for_crlf() {
        let mut input: &[u8] = b"GET / HTTP/1.1\nHost: x\n\n";
        assert!(matches!(read_head(&mut input).await, Err(HeadError::BareLf)));
        // Bytes after the head are the next protocol's, newlines included.
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\n\n";
        let (_, rest) = read_head(&mut input).await.unwrap();
        assert_eq!(rest, b"\n\n");
    }

    #[test]
    fn too_many_headers_is_too_large() {
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            head.push_str(&format!("X-{i}: y\r\n"));
        }
        head.push_str("\r\n");
        assert!(matches!(parse_head(head.as_bytes()), Err(HeadError::TooLarge)));
    }

    #[test]
    fn httparse_errors_are_typed() {
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), Err(HeadError::Syntax(_))));
        assert!(matches!(parse_head(b"GET / HTTP/2.0\r\n\r\n"), Err(HeadError::Syntax(_))));
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%20b%C3%A9"), Ok("a bé".to_string()));
        assert_eq!(percent_decode("%aé"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("%"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("ab%4"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("%ff"), Err(DecodeError::NotUtf8));
        assert_eq!(percent_decode("%C3"), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn query_values_are_form_decoded() {
        let q = Some("x=%zz&doc=a+b%2B%2F&doc=second");
        assert_eq!(query_value(q, "doc"), Ok(Some("a b+/".to_string())));
        assert_eq!(query_value(q, "x"), Err(DecodeError::BadEscape));
        assert_eq!(query_value(q, "missing"), Ok(None));
        assert_eq!(query_value(None, "doc"), Ok(None));
        assert_eq!(query_value(Some("doc=%aé"), "doc"), Err(DecodeError::BadEscape));
        assert_eq!(query_param(Some("doc=%aé"), "doc"), None);
    }

    #[test]
    fn bearer_credentials_are_read_from_authorization() {
        let req = |v: &str| Request {
            method: "GET".into(),
            path: "/".into(),
            query: None,
            headers: vec![("authorization".into(), v.into())],
        };
        assert_eq!(bearer(&req("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&req("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&req("Basic abc")), None);
        assert_eq!(bearer(&req("Bearer ")), None);
    }

    mod random {
        use proptest::prelude::*;

        use super::super::*;

        fn head_bytes() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..512),
                // Mostly-valid heads with arbitrary bytes spliced in reach deeper paths.
                (proptest::collection::vec(any::<u8>(), 0..64), 0usize..40).prop_map(|(junk, at)| {
                    let mut h = b"GET /sync?doc=a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".to_vec();
                    let at = at.min(h.len());
                    h.splice(at..at, junk);
                    h
                }),
            ]
        }

        proptest! {
            // Cheap cases: thousands of them, whatever smaller count the environment asks.
            #![proptest_config(ProptestConfig {
                cases: ProptestConfig::default().cases.max(4096),
                ..ProptestConfig::default()
            })]

            #[test]
            fn the_head_parser_never_panics_and_types_every_rejection(bytes in head_bytes()) {
                match parse_head(&bytes) {
                    Ok(req) => prop_assert!(req.path.starts_with('/')),
                    Err(HeadError::Eof | HeadError::Io(_)) => prop_assert!(false, "not an I/O path"),
                    Err(_) => {}
                }
                let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut input = bytes.as_slice();
                match rt.block_on(read_head(&mut input)) {
                    Ok((req, rest)) => {
                        prop_assert!(req.path.starts_with('/'));
                        prop_assert!(rest.len() <= bytes.len());
                    }
                    Err(HeadError::Io(e)) => prop_assert!(false, "unexpected I/O error {e}"),
                    Err(_) => {}
                }
            }

            #[test]
            fn percent_and_query_decoding_never_panic(s in "(%|[0-9a-fA-F]|[a-z=&+]|\\PC){0,48}", name in "[a-z]{1,3}") {
                match percent_decode(&s) {
                    Ok(decoded) => prop_assert!(decoded.len() <= s.len()),
                    Err(DecodeError::BadEscape | DecodeError::NotUtf8) => {}
                }
                let _ = query_value(Some(&s), &name);
                let _ = static_path(Path::new("/srv"), &s);
            }

            #[test]
            fn arbitrary_bytes_decode_or_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let s = String::from_utf8_lossy(&bytes);
                match percent_decode(&s) {
                    Ok(d) => prop_assert!(d.len() <= s.len()),
                    Err(e) => prop_assert!(matches!(e, DecodeError::BadEscape | DecodeError::NotUtf8)),
                }
            }
        }
    }
}
