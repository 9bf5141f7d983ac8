//! The health-check directives (NGINX Plus's names): `health_check` in a stream server,
//! `health_check_timeout` in a server or `stream {}`, and `match NAME { send; expect; }`
//! at `stream {}` level (its regex compiled by nginx's PCRE here). Values are parsed by
//! `upsync_core::health`; `resolve` ties each check to its upstream afterwards.

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;

use super::conf::{HcDirective, MatchDef};
use crate::ngx_util::{conf_words, pool_str, str_of};
use crate::srv_conf::SrvConf;
use upsync_core::health::{parse_health_check, parse_timeout, Expect, MatchBuilder};

/// `file:line` of the directive being parsed.
///
/// # Safety
/// As `words`.
pub unsafe fn position(cf: *mut ngx_conf_t) -> String {
    // SAFETY: per the contract the configuration file being read is set.
    unsafe {
        let f = (*cf).conf_file;
        if f.is_null() {
            return String::from("?");
        }
        format!("{}:{}", str_of(&(*f).file.name), (*f).line)
    }
}

/// `health_check [interval=] [jitter=] [fails=] [passes=] [port=] [udp] [match=]
/// [mandatory [persistent]]` in a stream server.
pub unsafe extern "C" fn cmd_health_check(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the stream server being parsed.
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    // SAFETY: positioned on this directive.
    let (w, at) = unsafe { (conf_words(cf), position(cf)) };
    if let Some(first) = &conf.hc_directive {
        conf_err!(
            cf,
            "health_check: this server already has one (at {}); one health_check per server",
            first.at
        );
    }
    let argv: Vec<&str> = w.iter().skip(1).map(String::as_str).collect();
    match parse_health_check(&argv) {
        Ok(spec) => conf.hc_directive = Some(HcDirective { spec, at }),
        // reported by `resolve`, which knows the upstream to name
        Err(e) => conf.hc_error = Some((e.to_string(), at)),
    }
    NGX_CONF_OK
}

/// `health_check_timeout TIME` (default 5s), in a stream server or `stream {}`.
pub unsafe extern "C" fn cmd_health_check_timeout(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the block being parsed.
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    if conf.hc_timeout.is_some() {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: positioned on this directive (TAKE1).
    let w = unsafe { conf_words(cf) };
    match parse_timeout(&w[1]) {
        Ok(ms) => conf.hc_timeout = Some(ms),
        Err(e) => conf_err!(cf, "health_check_timeout: {e}"),
    }
    NGX_CONF_OK
}

/// What the lines of a `match` block are collected into.
struct MatchParse {
    builder: MatchBuilder,
    /// The first bad line (reported by `resolve`).
    error: Option<String>,
}

/// `match NAME { send "..."; expect "..." | ~ "regex" | ~* "regex"; }` at stream level.
pub unsafe extern "C" fn cmd_match(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the `stream {}` level.
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    // SAFETY: positioned on this directive (TAKE1 with a block).
    let (w, at) = unsafe { (conf_words(cf), position(cf)) };
    let name = w[1].clone();
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()) {
        conf_err!(cf, "match: invalid name \"{name}\"");
    }
    if let Some(m) = conf.matches.iter().find(|m| m.rule.name == name) {
        conf_err!(
            cf,
            "match: \"{name}\" is already defined at {}; match names are unique",
            m.at
        );
    }
    let mut parse = MatchParse {
        builder: MatchBuilder::new(&name),
        error: None,
    };
    // SAFETY: the block is parsed with our line handler, which gets `parse` as its
    // conf; `cf` is restored afterwards, as nginx's own block directives do.
    let rv = unsafe {
        let saved = *cf;
        (*cf).handler = Some(match_line);
        (*cf).handler_conf = &mut parse as *mut MatchParse as *mut c_void;
        let rv = ngx_conf_parse(cf, ptr::null_mut());
        *cf = saved;
        rv
    };
    if rv != NGX_CONF_OK {
        return rv;
    }
    // What is wrong with the block is reported once the configuration is read, naming
    // the upstreams whose checks use it (`resolve`).
    let rule = parse.builder.finish();
    let mut error = parse.error;
    if error.is_none() && rule.send.is_empty() && rule.expect.is_none() {
        error = Some("has neither \"send\" nor \"expect\"; give at least one".into());
    }
    let regex = match (&error, &rule.expect) {
        (None, Some(Expect::Regex { pattern, caseless })) => {
            // SAFETY: `cf` is the configuration being parsed; the regex lives in its pool.
            match unsafe { compile_regex(cf, pattern, *caseless) } {
                Ok(re) => re,
                Err(why) => {
                    error = Some(format!("invalid regex \"{pattern}\": {why}"));
                    ptr::null_mut()
                }
            }
        }
        _ => ptr::null_mut(),
    };
    conf.matches.push(MatchDef {
        rule,
        regex,
        at,
        error,
    });
    NGX_CONF_OK
}

/// One line of a `match` block.
unsafe extern "C" fn match_line(
    cf: *mut ngx_conf_t,
    _dummy: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `cmd_match` set `conf` to its `MatchParse`, alive while the block is
    // parsed; nginx positions `cf` on the line.
    let (parse, w) = unsafe { (&mut *(conf as *mut MatchParse), conf_words(cf)) };
    let Some((directive, rest)) = w.split_first() else {
        return NGX_CONF_ERROR;
    };
    let argv: Vec<&str> = rest.iter().map(String::as_str).collect();
    if let Err(e) = parse.builder.line(directive, &argv) {
        parse.error.get_or_insert(e.to_string());
    }
    NGX_CONF_OK
}

/// Compiles `pattern` with nginx's PCRE (`~*`: caseless).
///
/// # Safety
/// `cf` is the configuration being parsed (the regex is allocated in its pool).
unsafe fn compile_regex(
    cf: *mut ngx_conf_t,
    pattern: &str,
    caseless: bool,
) -> Result<*mut ngx_regex_t, String> {
    let mut err = [0u8; NGX_MAX_CONF_ERRSTR as usize];
    // SAFETY: per the contract; `rc` is zeroed and then filled as ngx_regex_compile
    // expects (pattern in the pool, an error buffer that outlives the call).
    unsafe {
        let Some(text) = pool_str((*cf).pool, pattern) else {
            return Err("out of memory".into());
        };
        let mut rc: ngx_regex_compile_t = std::mem::zeroed();
        rc.pattern = text;
        rc.pool = (*cf).pool;
        rc.options = if caseless {
            NGX_REGEX_CASELESS as ngx_uint_t
        } else {
            0
        };
        rc.err = ngx_str_t {
            len: err.len(),
            data: err.as_mut_ptr(),
        };
        if ngx_regex_compile(&mut rc) != NGX_OK as ngx_int_t {
            return Err(str_of(&rc.err));
        }
        Ok(rc.regex)
    }
}
