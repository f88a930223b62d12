//! Mail straight into and out of Dovecot's Maildirs: test messages, bulk
//! seeding (files written as the mail user, as a delivery agent would) and
//! the size of a maildrop. Both fetchers' tests, the end-to-end stack and
//! the benchmarks seed through here.

use std::io::Write;
use std::path::PathBuf;

use crate::env::Endpoints;

/// A test message with a unique Message-ID, `size` bytes or a little more;
/// `dots` adds lines that start with "." (dot-stuffed on the POP3 wire).
pub fn message(tag: &str, i: usize, size: usize, dots: bool) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.com\r\nTo: forms@example.com\r\nSubject: test {tag} {i}\r\nMessage-ID: <{tag}.{i}@test.example>\r\nDate: Thu, 01 Feb 2024 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    if dots {
        m.extend_from_slice(b".leading dot\r\n..two dots\r\n.\r\n. dot space\r\n");
    }
    let line = format!("message {i} of {tag} padding padding padding padding padding\r\n");
    while m.len() < size {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// The Maildir of a mailbox.
pub fn maildir(env: &Endpoints, mailbox: &str) -> PathBuf {
    let layout = env
        .get("MAILAGENT_TEST_MAIL_LAYOUT")
        .replace("%u", &mailbox.to_lowercase());
    PathBuf::from(env.get("MAILAGENT_TEST_MAIL_ROOT")).join(layout)
}

/// The uid and gid of the user Dovecot's mail files belong to.
fn owner_ids(env: &Endpoints) -> (u32, u32) {
    let user = env.get("MAILAGENT_TEST_MAIL_OWNER");
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .arg(flag)
            .arg(user)
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// Seeds the inbox by writing Maildir files directly (fast for thousands of
/// messages): `tmp/` then rename into `new/`, owned by the mail user.
/// Dovecot assigns IMAP UIDs and POP3 message numbers when it next looks.
pub fn seed(env: &Endpoints, mailbox: &str, messages: &[Vec<u8>]) {
    let root = maildir(env, mailbox);
    let (uid, gid) = owner_ids(env);
    let home = root.parent().expect("home").to_path_buf();
    for dir in [
        &home,
        &root,
        &root.join("cur"),
        &root.join("new"),
        &root.join("tmp"),
    ] {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown dir");
    }
    let stamp = common::heartbeat::now_secs();
    for (i, m) in messages.iter().enumerate() {
        // The random part keeps names unique when one test seeds twice in
        // the same second.
        let name = format!(
            "{stamp}.M{i:06}P{}R{:08x}.seed,S={}",
            std::process::id(),
            rand::random::<u32>(),
            m.len()
        );
        let tmp = root.join("tmp").join(&name);
        let mut f = std::fs::File::create(&tmp).expect("create");
        f.write_all(m).expect("write");
        drop(f);
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).expect("chown");
        std::fs::rename(&tmp, root.join("new").join(&name)).expect("rename");
    }
}

/// Files in a mailbox's Maildir (`new` + `cur`): its maildrop's size.
pub fn len(env: &Endpoints, mailbox: &str) -> usize {
    let root = maildir(env, mailbox);
    ["new", "cur"]
        .iter()
        .map(|d| {
            std::fs::read_dir(root.join(d))
                .map(|r| r.count())
                .unwrap_or(0)
        })
        .sum()
}

/// Removes a mailbox's home directory (its Maildir and Dovecot's indexes).
pub fn remove(env: &Endpoints, mailbox: &str) {
    if let Some(home) = maildir(env, mailbox).parent() {
        let _ = std::fs::remove_dir_all(home);
    }
}
