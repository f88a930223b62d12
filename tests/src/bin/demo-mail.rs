//! Mails the demo's sample offline forms into the demo mailboxes (test
//! support for `scripts/demo`): valid lease forms over IMAP and POP3, a
//! duplicate Lease ID, a sender not allowed, and a broken workbook.

use clap::Parser;
use mailagent_tests::env::Endpoints;
use mailagent_tests::forms::{lease_workbook, mail, Attachment, Lease, LEASE_SUBJECT};
use mailagent_tests::imap_support::append;

/// Sample forms for the demo.
#[derive(Debug, Parser)]
struct Args {
    /// Mailbox the IMAP config reads.
    #[arg(long)]
    imap_mailbox: String,
    /// Mailbox the POP3 config reads.
    #[arg(long)]
    pop_mailbox: String,
    /// `valid` (the three valid forms) or `invalid` (the three that are
    /// rejected); the demo sends the second set once the first is recorded,
    /// so the duplicate is always the later mail.
    #[arg(long, default_value = "valid")]
    set: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let env = Endpoints::load();
    let form = |id: &'static str, name: &'static str, rent: f64| {
        lease_workbook(&Lease {
            id,
            name,
            rent,
            ..Lease::default()
        })
    };
    let mut broken = form("L-9", "Broken", 1.0);
    broken.truncate(broken.len() / 2);
    let samples: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            &args.imap_mailbox,
            "valid form L-1001 (IMAP)",
            mail(
                LEASE_SUBJECT,
                "ann@contoso.com",
                &[],
                &[Attachment::xlsx(form("L-1001", "Main Street 1", 1200.5))],
            ),
            "a record",
        ),
        (
            &args.pop_mailbox,
            "valid form L-1002 (POP3)",
            mail(
                LEASE_SUBJECT,
                "bob@contoso.com",
                &[],
                &[Attachment::xlsx(form("L-1002", "Harbour View 7", 2450.0))],
            ),
            "a record",
        ),
        (
            &args.imap_mailbox,
            "valid form L-1003 (IMAP)",
            mail(
                LEASE_SUBJECT,
                "carol@contoso.com",
                &[],
                &[Attachment::xlsx(form("L-1003", "Old Mill 3", 980.0))],
            ),
            "a record",
        ),
        (
            &args.pop_mailbox,
            "duplicate Lease ID L-1001",
            mail(
                LEASE_SUBJECT,
                "dan@contoso.com",
                &[],
                &[Attachment::xlsx(form(
                    "L-1001",
                    "Main Street 1 (again)",
                    1200.5,
                ))],
            ),
            "rejected: duplicate",
        ),
        (
            &args.imap_mailbox,
            "sender not allowed",
            mail(
                LEASE_SUBJECT,
                "mallory@evil.example",
                &[],
                &[Attachment::xlsx(form("L-6666", "Nowhere", 1.0))],
            ),
            "rejected: sender not allowed",
        ),
        (
            &args.pop_mailbox,
            "broken workbook",
            mail(
                LEASE_SUBJECT,
                "erin@contoso.com",
                &[],
                &[Attachment::xlsx(broken)],
            ),
            "rejected: malformed workbook",
        ),
    ];
    let (valid, invalid) = samples.split_at(3);
    let chosen = if args.set == "invalid" {
        invalid
    } else {
        valid
    };
    for (mailbox, what, message, expected) in chosen {
        append(&env, mailbox, "INBOX", message).await;
        println!("  mailed {what:<28} to {mailbox:<26} expected: {expected}");
    }
}
