//! Configuration (§2) through the real binaries: every bad configuration
//! exits 2 naming its key; several errors in different sections are all
//! reported by every binary; a good file with an environment override and a
//! secret from a file loads; no secret ever appears in output or `Debug`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::config::{load, Component, LoadOptions, MailAuth};
use mailagent_tests::env::bin_path;

const BINARIES: &[&str] = &[
    "token-broker",
    "imap-fetcher",
    "pop-fetcher",
    "form-processor",
];
const CLIENT_SECRET: &str = "Zq8~S3cr3tValue.ThatMustNeverPrint";
const MAIL_PASSWORD: &str = "mail-P4ssw0rd-never-printed";
const AMQP_PASSWORD: &str = "amqp-pw-never-printed";

/// A directory with a valid configuration and its secret files.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("client-secret"),
            format!("{CLIENT_SECRET}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("token-key"),
            "  MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The §2 example, with the fixture's secret files.
    fn good_toml(&self) -> String {
        format!(
            r#"
[redis]
url = "redis://127.0.0.1:6379/0"
[amqp]
url = "amqp://user:{AMQP_PASSWORD}@127.0.0.1:5672/%2f"
[token-broker]
encryption-key-file = "{key}"
[form-processor]
store = "sqlite://data/records.db"
[admin]
listen = "127.0.0.1:9100"

[[oauth-profiles]]
name = "contoso"
provider = "Azure"
access-type = "application"
application-key = "00000000-0000-0000-0000-000000000000"
application-secret-file = "{secret}"
authorize-url = "https://login.microsoftonline.com/tenant/oauth2/v2.0/authorize"
token-url = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"
scope = "https://outlook.office365.com/.default"

[[incoming-mail]]
name = "lease-forms"
host = "outlook.office365.com"
folder = "INBOX"
action = "CREATE"
username = "forms@contoso.com"
mail-server-type = "imaps"
port = 993
oauth-profile = "contoso"
after-fetch = "mark-seen"

[[incoming-mail]]
name = "legacy-pop"
host = "pop.example.net"
username = "forms@example.net"
password = "{MAIL_PASSWORD}"
mail-server-type = "pop3s"

[[topics]]
subject = "LEASE ABSTRACT FORM"
module = "triContract"
business-object = "triLeaseAbstract"
required = ["triIdTX"]
unique = ["triIdTX"]
senders = ["@contoso.com"]
"#,
            key = self.path("token-key").display(),
            secret = self.path("client-secret").display(),
        )
    }

    fn write(&self, name: &str, toml: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, toml).unwrap();
        p
    }
}

fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin_path(binary));
    cmd.args(args).env_remove("MAILAGENT_CONFIG");
    for (k, _) in std::env::vars()
        .filter(|(k, _)| k.starts_with("MAILAGENT_") && !k.starts_with("MAILAGENT_TEST"))
    {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run binary")
}

fn check(binary: &str, config: &Path) -> Output {
    let config = config.to_str().unwrap();
    if binary == "mailagent" {
        run(binary, &["check-config", "--config", config], &[])
    } else {
        run(binary, &["--config", config, "--check-config"], &[])
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_secret(s: &str) {
    for secret in [
        CLIENT_SECRET,
        MAIL_PASSWORD,
        AMQP_PASSWORD,
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    ] {
        assert!(!s.contains(secret), "a secret was printed:\n{s}");
    }
}

/// An edit of the good file.
type Edit = Box<dyn Fn(String) -> String>;

/// (what, edit of the good file, key path the message must name)
fn bad_cases() -> Vec<(&'static str, Edit, &'static str)> {
    fn replace(from: &'static str, to: &'static str) -> Edit {
        Box::new(move |s: String| {
            assert!(s.contains(from), "fixture lacks {from:?}");
            s.replacen(from, to, 1)
        })
    }
    vec![
        (
            "unknown mail-server-type",
            replace(
                r#"mail-server-type = "imaps""#,
                r#"mail-server-type = "smtp""#,
            ),
            "incoming-mail[0].mail-server-type",
        ),
        (
            "port out of range",
            replace("port = 993", "port = 70000"),
            "incoming-mail[0].port",
        ),
        (
            "port not a number",
            replace("port = 993", r#"port = "nine""#),
            "incoming-mail[0].port",
        ),
        (
            "action other than CREATE",
            replace(r#"action = "CREATE""#, r#"action = "UPDATE""#),
            "incoming-mail[0].action",
        ),
        (
            "oauth-profile naming no profile",
            replace(
                r#"oauth-profile = "contoso""#,
                r#"oauth-profile = "fabrikam""#,
            ),
            "incoming-mail[0].oauth-profile",
        ),
        (
            "duplicate names",
            replace(r#"name = "legacy-pop""#, r#"name = "lease-forms""#),
            "incoming-mail[1].name",
        ),
        (
            "token-url not https",
            replace("token-url = \"https://", "token-url = \"http://"),
            "oauth-profiles[0].token-url",
        ),
        (
            "missing secret",
            replace("application-secret-file = ", "# application-secret-file = "),
            "oauth-profiles[0].application-secret",
        ),
        (
            "pop3 without TLS or allow-insecure",
            replace(
                r#"mail-server-type = "pop3s""#,
                "mail-server-type = \"pop3\"\nstarttls = false",
            ),
            "incoming-mail[1].starttls",
        ),
        (
            "unreadable secret file",
            replace("client-secret\"", "no-such-secret\""),
            "oauth-profiles[0].application-secret-file",
        ),
        (
            "bad redis URL",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "url = \"http://127.0.0.1:6379\"",
            ),
            "redis.url",
        ),
        (
            "bad amqp URL",
            replace("url = \"amqp://", "url = \"amqp//"),
            "amqp.url",
        ),
        (
            "unknown key",
            replace("folder = \"INBOX\"", "folder = \"INBOX\"\nfolders = \"x\""),
            "incoming-mail[0].folders",
        ),
        (
            "after-fetch unknown",
            replace(r#"after-fetch = "mark-seen""#, r#"after-fetch = "shred""#),
            "incoming-mail[0].after-fetch",
        ),
        (
            "mark-seen on POP3",
            replace(
                r#"mail-server-type = "pop3s""#,
                "mail-server-type = \"pop3s\"\nafter-fetch = \"mark-seen\"",
            ),
            "incoming-mail[1].after-fetch",
        ),
        (
            "scope without /.default",
            replace(
                r#"scope = "https://outlook.office365.com/.default""#,
                r#"scope = "IMAP.AccessAsApp""#,
            ),
            "oauth-profiles[0].scope",
        ),
        (
            "sender neither address nor domain",
            replace(r#"senders = ["@contoso.com"]"#, r#"senders = ["contoso"]"#),
            "topics[0].senders[0]",
        ),
        (
            "invalid subject regex",
            replace(
                r#"subject = "LEASE ABSTRACT FORM""#,
                r#"subject = "/LEASE (/""#,
            ),
            "topics[0].subject",
        ),
        (
            "admin listen not an address",
            replace(r#"listen = "127.0.0.1:9100""#, r#"listen = "localhost""#),
            "admin.listen",
        ),
        (
            "unknown queue type",
            replace("[amqp]\n", "[amqp]\nqueue-type = \"stream\"\n"),
            "amqp.queue-type",
        ),
        (
            "token key missing",
            replace("encryption-key-file = ", "# encryption-key-file = "),
            "token-broker.encryption-key-file",
        ),
        (
            "password and oauth-profile both",
            replace(
                r#"oauth-profile = "contoso""#,
                "oauth-profile = \"contoso\"\npassword = \"x\"",
            ),
            "incoming-mail[0].password",
        ),
        (
            "store scheme",
            replace(
                r#"store = "sqlite://data/records.db""#,
                r#"store = "mysql://h/db""#,
            ),
            "form-processor.store",
        ),
        ("TOML syntax", replace("[redis]", "[redis"), "config.toml"),
        (
            "amqp url and urls both set",
            replace(
                "[amqp]\n",
                "[amqp]\nurls = [\"amqp://a:b@127.0.0.1:5673/%2f\"]\n",
            ),
            "amqp.urls",
        ),
        ("amqp urls empty", amqp_urls("[]"), "amqp.urls"),
        (
            "amqp urls with a bad scheme",
            amqp_urls(r#"["amqp://n1:5672/%2f", "http://n2:5672/"]"#),
            "amqp.urls[1]",
        ),
        (
            "amqp urls listing a node twice",
            amqp_urls(r#"["amqp://n1:5672/%2f", "amqp://n1:5672/%2f"]"#),
            "amqp.urls[1]",
        ),
        (
            "quorum delivery limit not above the processor's",
            replace(
                "[amqp]\n",
                "[amqp]\nqueue-type = \"quorum\"\ndelivery-limit = 5\n",
            ),
            "amqp.delivery-limit",
        ),
        (
            "redis url and sentinels both",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "url = \"redis://127.0.0.1:6379/0\"\nsentinels = [\"redis://127.0.0.1:26379\"]\nmaster-name = \"m\"",
            ),
            "redis.sentinels",
        ),
        (
            "redis username with a single url",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "url = \"redis://127.0.0.1:6379/0\"\nusername = \"mailagent-cli\"",
            ),
            "redis.username",
        ),
        (
            "redis sentinels without master-name",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "sentinels = [\"redis://127.0.0.1:26379\"]",
            ),
            "redis.master-name",
        ),
        (
            "redis master-name without sentinels",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "url = \"redis://127.0.0.1:6379/0\"\nmaster-name = \"m\"",
            ),
            "redis.master-name",
        ),
        (
            "redis sentinels and cluster both",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "sentinels = [\"redis://127.0.0.1:26379\"]\nmaster-name = \"m\"\ncluster = [\"redis://127.0.0.1:7000\"]",
            ),
            "redis.cluster",
        ),
        (
            "redis empty sentinels",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "sentinels = []\nmaster-name = \"m\"",
            ),
            "redis.sentinels",
        ),
        (
            "redis cluster node not a redis URL",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "cluster = [\"redis://127.0.0.1:7000\", \"http://127.0.0.1:7001\"]",
            ),
            "redis.cluster[1]",
        ),
        (
            "redis cluster node with a database other than 0",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "cluster = [\"redis://127.0.0.1:7000/3\"]",
            ),
            "redis.cluster[0]",
        ),
        (
            "redis sentinel-password without sentinels",
            replace(
                "url = \"redis://127.0.0.1:6379/0\"",
                "url = \"redis://127.0.0.1:6379/0\"\nsentinel-password = \"x\"",
            ),
            "redis.sentinel-password",
        ),
    ]
}

/// The good file with `[amqp] url` replaced by `urls = <list>`.
fn amqp_urls(list: &'static str) -> Edit {
    Box::new(move |s: String| {
        let line = s
            .lines()
            .find(|l| l.starts_with("url = \"amqp://"))
            .expect("fixture has [amqp] url")
            .to_string();
        s.replacen(&line, &format!("urls = {list}"), 1)
    })
}

/// `[amqp] urls` lists several nodes (with their passwords never printed);
/// on quorum queues the default `[amqp] delivery-limit` (20) passes with the
/// processor's default (5), and one that does not exceed the processor's
/// names both keys.
#[test]
fn amqp_urls_and_the_quorum_delivery_limit_are_validated() {
    let f = Fixture::new();
    let good = amqp_urls(
        r#"["amqp://user:amqp-pw-never-printed@127.0.0.1:5672/%2f", "amqps://user:amqp-pw-never-printed@n2.example:5671/%2f"]"#,
    )(f.good_toml())
    .replacen("[amqp]\n", "[amqp]\nqueue-type = \"quorum\"\n", 1);
    let path = f.write("config.toml", &good);
    for binary in BINARIES.iter().chain(&["mailagent"]) {
        let out = check(binary, &path);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(0), "{binary}: {all}");
        assert!(all.contains("n2.example"), "{binary}: {all}");
        assert_no_secret(&all);
    }
    let config = load(
        &LoadOptions {
            path: Some(path.clone()),
            env: vec![],
        },
        Component::FormProcessor,
    )
    .unwrap();
    assert_eq!(config.amqp.urls.len(), 2);
    assert_eq!(config.amqp.delivery_limit, 20);
    assert_eq!(
        config.amqp.delivery_limit,
        common::config::DEFAULT_DELIVERY_LIMIT
    );

    let equal = good.replacen(
        "[form-processor]\n",
        "[form-processor]\ndelivery-limit = 20\n",
        1,
    );
    let out = check("form-processor", &f.write("config.toml", &equal));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("amqp.delivery-limit"), "{all}");
    assert!(all.contains("form-processor.delivery-limit"), "{all}");
    // On classic queues RabbitMQ has no delivery limit: nothing to check.
    let classic = equal.replacen("queue-type = \"quorum\"\n", "", 1);
    let out = check("form-processor", &f.write("config.toml", &classic));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn redis_sentinel_and_cluster_forms_load_and_print_no_password() {
    const SENTINEL_PW: &str = "sentinel-pw-never-printed";
    const NODE_PW: &str = "node-pw-never-printed";
    let f = Fixture::new();
    let url = "url = \"redis://127.0.0.1:6379/0\"";
    let forms = [
        (
            format!(
                "sentinels = [\"redis://127.0.0.1:26379\", \"redis://127.0.0.1:26380\"]\nmaster-name = \"mailagent\"\nsentinel-password = \"{SENTINEL_PW}\"\npassword = \"{NODE_PW}\""
            ),
            "redis: sentinel master mailagent via redis://127.0.0.1:26379,redis://127.0.0.1:26380",
        ),
        (
            format!(
                "cluster = [\"redis://:{NODE_PW}@127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]"
            ),
            "redis: cluster redis://:",
        ),
    ];
    for (form, summary) in forms {
        let path = f.write("config.toml", &f.good_toml().replacen(url, &form, 1));
        for binary in ["mailagent", "imap-fetcher"] {
            let out = check(binary, &path);
            let all = text(&out);
            assert_eq!(out.status.code(), Some(0), "{binary}: {all}");
            assert!(all.contains(summary), "{binary}: {all}");
            assert_no_secret(&all);
            assert!(
                !all.contains(SENTINEL_PW) && !all.contains(NODE_PW),
                "{all}"
            );
        }
    }
    // From the environment: a comma-separated list.
    let path = f.write("config.toml", &f.good_toml().replacen(url, "", 1));
    let out = run(
        "mailagent",
        &["check-config", "--config", path.to_str().unwrap()],
        &[(
            "MAILAGENT_REDIS__CLUSTER",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        )],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("redis: cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001"),
        "{all}"
    );
}

#[test]
fn good_config_passes_check_config_in_every_binary_and_prints_no_secret() {
    let f = Fixture::new();
    let path = f.write("config.toml", &f.good_toml());
    for binary in BINARIES.iter().chain(&["mailagent"]) {
        let out = check(binary, &path);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(0), "{binary}: {all}");
        assert!(all.contains("configuration is valid"), "{binary}: {all}");
        assert!(all.contains("lease-forms"), "{binary}: {all}");
        assert_no_secret(&all);
    }
}

#[test]
fn every_bad_config_exits_2_naming_its_key() {
    let f = Fixture::new();
    let cases = bad_cases();
    assert!(cases.len() >= 15);
    for (i, (what, edit, key)) in cases.iter().enumerate() {
        let path = f.write("config.toml", &edit(f.good_toml()));
        // Spread the cases over the binaries: each validates the whole file.
        // (A secret file is read only by the binaries that use it.)
        let binary = if *what == "unreadable secret file" {
            "token-broker"
        } else {
            BINARIES[i % BINARIES.len()]
        };
        let out = check(binary, &path);
        let all = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what} via {binary}: expected exit 2, got {:?}: {all}",
            out.status
        );
        assert!(
            all.contains(key),
            "{what} via {binary}: message does not name {key}:\n{all}"
        );
        assert!(!all.contains("panicked"), "{what}: {all}");
        assert_no_secret(&all);
    }
}

#[test]
fn several_errors_in_different_sections_are_all_reported_by_every_binary() {
    let f = Fixture::new();
    let toml = f
        .good_toml()
        .replace("port = 993", "port = 0")
        .replace("token-url = \"https://", "token-url = \"ftp://")
        .replace(r#"senders = ["@contoso.com"]"#, "senders = []")
        .replace(r#"listen = "127.0.0.1:9100""#, r#"listen = "nowhere""#);
    let path = f.write("config.toml", &toml);
    let keys = [
        "incoming-mail[0].port",
        "oauth-profiles[0].token-url",
        "topics[0].senders",
        "admin.listen",
    ];
    for binary in BINARIES.iter().chain(&["mailagent"]) {
        let out = check(binary, &path);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{binary}: {all}");
        for key in keys {
            assert!(all.contains(key), "{binary} did not report {key}:\n{all}");
        }
    }
}

#[test]
fn config_flag_is_global_before_or_after_the_subcommand() {
    let f = Fixture::new();
    let path = f.write("config.toml", &f.good_toml());
    let p = path.to_str().unwrap();
    for args in [
        ["--config", p, "check-config"],
        ["check-config", "--config", p],
    ] {
        let out = run("mailagent", &args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    }
    let out = run("mailagent", &["check-config"], &[("MAILAGENT_CONFIG", p)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "MAILAGENT_CONFIG: {}",
        text(&out)
    );
}

#[test]
fn environment_overrides_the_file_and_secrets_come_from_files() {
    let f = Fixture::new();
    let path = f.write("config.toml", &f.good_toml());
    std::fs::write(
        f.path("amqp-url"),
        "amqp://svc:from-file-pw@rabbit:5672/%2f\n",
    )
    .unwrap();
    let env = vec![
        ("MAILAGENT_REDIS__PREFIX".to_string(), "tenant7".to_string()),
        (
            "MAILAGENT_ADMIN__LISTEN".to_string(),
            "0.0.0.0:9200".to_string(),
        ),
        ("MAILAGENT_AMQP__URL".to_string(), String::new()),
    ];
    // An empty override of a secret is refused...
    let options = LoadOptions {
        path: Some(path.clone()),
        env: env.clone(),
    };
    let errors = load(&options, Component::Cli).unwrap_err();
    assert!(errors.to_string().contains("amqp.url"), "{errors}");
    // ...while `_FILE` indirection replaces the file's value.
    let mut env = env;
    env.pop();
    env.push((
        "MAILAGENT_AMQP__URL_FILE".into(),
        f.path("amqp-url").display().to_string(),
    ));
    // The file also sets `url`: with both set, validation asks to choose; so
    // drop the file's inline url for this case.
    let toml = f.good_toml().replace(
        &format!("url = \"amqp://user:{AMQP_PASSWORD}@127.0.0.1:5672/%2f\"\n"),
        "",
    );
    let path = f.write("config2.toml", &toml);
    let config = load(
        &LoadOptions {
            path: Some(path),
            env,
        },
        Component::Cli,
    )
    .unwrap();
    assert_eq!(config.redis.prefix, "tenant7");
    assert_eq!(config.admin.listen.to_string(), "0.0.0.0:9200");
    assert_eq!(
        config.amqp.url.expose(),
        "amqp://svc:from-file-pw@rabbit:5672/%2f"
    );
    let profile = config.profile("contoso").unwrap();
    match &profile.credential {
        common::config::Credential::Secret { value, .. } => {
            assert_eq!(value.as_ref().unwrap().expose(), CLIENT_SECRET)
        }
        other => panic!("{other:?}"),
    }
    match &config.mail_config("legacy-pop").unwrap().auth {
        MailAuth::Password { password } => {
            assert_eq!(password.as_ref().unwrap().expose(), MAIL_PASSWORD)
        }
        other => panic!("{other:?}"),
    }
    // The same through a binary's summary.
    let out = run(
        "token-broker",
        &[
            "--check-config",
            "--config",
            f.path("config.toml").to_str().unwrap(),
        ],
        &[("MAILAGENT_REDIS__PREFIX", "tenant9")],
    );
    assert!(text(&out).contains("prefix tenant9"), "{}", text(&out));
}

#[test]
fn debug_of_a_loaded_config_holds_no_secret() {
    let f = Fixture::new();
    let path = f.write("config.toml", &f.good_toml());
    let config = load(
        &LoadOptions {
            path: Some(path),
            env: vec![],
        },
        Component::Cli,
    )
    .unwrap();
    let debug = format!("{config:?} {config:#?}");
    assert_no_secret(&debug);
    assert!(debug.contains("[redacted]"));
    let json = serde_json::to_string(&config).unwrap();
    assert_no_secret(&json);
    // The key bytes are not printed either.
    assert!(!debug.contains("48, 49, 50, 51"), "key bytes printed");
}

#[test]
fn components_read_only_the_secrets_they_use() {
    let f = Fixture::new();
    let toml = f.good_toml().replace("client-secret\"", "no-such-secret\"");
    let path = f.write("config.toml", &toml);
    // The form processor never reads the client secret, so its absence in
    // that container is not an error there; the broker needs it.
    assert_eq!(check("form-processor", &path).status.code(), Some(0));
    assert_eq!(check("token-broker", &path).status.code(), Some(2));
}

#[test]
fn no_input_makes_the_loader_panic() {
    let f = Fixture::new();
    let inputs = [
        "",
        "[[redis]]",
        "redis = 5",
        "[[incoming-mail]]\nport = -1",
        "[[incoming-mail]]\nname = \"{x}\"",
        "[[oauth-profiles]]\nname = 1",
        "topics = \"x\"",
        "[[topics]]\nsubject = \"/\"",
        "[admin]\nlisten = []",
        "[token-broker]\nencryption-key-files = [1, \"\"]",
        "[[incoming-mail]]\nmail-server-type = \"pop3\"\nafter-fetch = \"move:\"",
        "\u{0}\u{1}",
        "[form-processor]\nprefetch = 1e99",
    ];
    for input in inputs {
        let path = f.write("fuzz.toml", input);
        let result = std::panic::catch_unwind(|| {
            load(
                &LoadOptions {
                    path: Some(path.clone()),
                    env: vec![],
                },
                Component::Cli,
            )
        });
        assert!(result.is_ok(), "loader panicked on {input:?}");
    }
}
