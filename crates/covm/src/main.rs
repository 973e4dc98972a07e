//! `covm`: the server (`covm serve`) and the command line client for everything else.
//!
//! Exit codes scripts can trust: 0 done; 1 a fault (covm unreachable, a server error); 2 bad usage;
//! 3 not found; 4 not signed in or not allowed; 5 conflict with the current state (409, 412, 423);
//! 6 the request was refused as invalid (400, 413); 7 try again later (429, 503).

mod creds;
mod datastore;
mod disk;
mod network;
mod output;
mod provision;
mod vm;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use covm_client::{Client, ClientError};
use covm_types::Privilege;
use covm_types::api::{AuditQuery, EventQuery, PermissionQuery};
use futures::StreamExt;

use output::{Out, print_events};

#[derive(Parser)]
#[command(name = "covm", version, about = "A shared virtual-machine host for a team")]
struct Cli {
    /// The covm server.
    #[arg(long, global = true, env = "COVM_URL", default_value = "http://127.0.0.1:8006")]
    url: String,
    /// Trust exactly this CA certificate (PEM) for an https:// server, instead of the one trusted at
    /// `covm login` (known_servers.json) or the system's.
    #[arg(long, global = true, env = "COVM_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the covm server.
    Serve(Box<ServeArgs>),
    /// Sign in and keep the session token in the config dir (mode 0600).
    Login {
        #[arg(short, long, default_value = "admin")]
        user: String,
        /// Read the password from this file (first line); otherwise COVM_PASSWORD, or a prompt.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Trust the server's CA if its SHA-256 fingerprint is this one (`AB:CD:…`, as `covm serve`
        /// logs it), without asking.
        #[arg(long, value_name = "FINGERPRINT")]
        trust: Option<String>,
        /// The current two-factor code (otherwise asked for when the server needs one).
        #[arg(long, conflicts_with = "recovery_code")]
        totp: Option<String>,
        /// A recovery code instead of a two-factor code (each works once).
        #[arg(long)]
        recovery_code: Option<String>,
        /// Sign in through the server's identity provider (single sign-on): covm prints a code to
        /// enter at the provider's page, and waits.
        #[arg(long, conflicts_with_all = ["password_file", "totp", "recovery_code"])]
        sso: bool,
    },
    /// Sign out and forget the token.
    Logout,
    /// Who am I, and what may I do (on --object, default /).
    Whoami {
        #[arg(long)]
        object: Option<String>,
    },
    /// List a folder (default /).
    Ls { path: Option<String> },
    /// Folders.
    #[command(subcommand)]
    Folder(FolderCmd),
    /// Users.
    #[command(subcommand)]
    User(UserCmd),
    /// Groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Roles.
    #[command(subcommand)]
    Role(RoleCmd),
    /// Permissions: grants of a role to a user or group on an object.
    #[command(subcommand)]
    Permission(PermissionCmd),
    /// First-class disks: create, ls, info, resize, clone, import, rm.
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// Files in a datastore (ISOs, images to import, kernels): upload, ls, download, rm.
    #[command(subcommand)]
    Datastore(datastore::DatastoreCmd),
    /// VMs: create, change, edit, history, diff, revert, leases, clone, template, NICs, guest.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Networks: user, bridge (VLAN) and NAT (DHCP, DNS, port forwards).
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Hosts, datastores, networks and pools.
    #[command(subcommand)]
    Inventory(InventoryCmd),
    /// The change feed.
    Events {
        /// Follow the live feed.
        #[arg(short, long)]
        follow: bool,
        /// Start after this sequence number (default: the latest page, or now with -f).
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The audit log (needs Audit.Read), or `audit verify`.
    Audit(AuditArgs),
    /// Policies: `policy mfa`.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The master key of encrypted disks: `keys rotate`.
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// Where covm keeps its database, datastores and VM files.
    #[arg(long, env = "COVM_DATA_DIR", default_value = "covm-data")]
    data_dir: PathBuf,
    #[arg(long, env = "COVM_LISTEN", default_value = "127.0.0.1:8006")]
    listen: SocketAddr,
    /// On the first start, also create a demo inventory (folders team-a, team-b; pool small).
    #[arg(long)]
    demo: bool,
    /// `qemu` runs real VMs; `sim` simulates them (for machines without QEMU).
    #[arg(long, env = "COVM_DRIVER", default_value = "qemu", value_parser = ["qemu", "sim"])]
    driver: String,
    /// PostgreSQL (`postgres://user@host:port/database`) for several replicas on one database
    /// (docs/DEPLOYMENT.md); by default, SQLite in the data directory.
    #[arg(long, env = "COVM_DB")]
    db: Option<String>,
    /// The URL other replicas reach this one at (default: http:// and --listen); requests about a VM
    /// this node runs are forwarded there.
    #[arg(long, env = "COVM_ADVERTISE")]
    advertise: Option<String>,
    /// At most this many client connections at once (default 4096, lowered to fit the open-file
    /// limit with room for work).
    #[arg(long, env = "COVM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Days a safety snapshot is kept before it is deleted (unless pinned).
    #[arg(long, env = "COVM_SAFETY_SNAPSHOT_DAYS", value_parser = clap::value_parser!(u32).range(1..=3650))]
    safety_snapshot_days: Option<u32>,
    /// Seconds a presence heartbeat (a user viewing or editing a VM in the web UI) counts.
    #[arg(long, env = "COVM_PRESENCE_TTL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    presence_ttl_s: u64,
    /// Run VMs, their taps and the networks covm makes in this network namespace (made with
    /// `ip netns add`); default: the host's own.
    #[arg(long, env = "COVM_NETNS")]
    netns: Option<String>,
    /// Serve TLS also on a loopback address (beyond loopback it is the default).
    #[arg(long, conflicts_with = "no_tls")]
    tls: bool,
    /// Serve plain HTTP (refused beyond loopback unless --insecure-http).
    #[arg(long)]
    no_tls: bool,
    /// Allow plain HTTP on an address beyond loopback (behind something that encrypts for covm).
    #[arg(long, env = "COVM_INSECURE_HTTP")]
    insecure_http: bool,
    /// The server's certificate chain (PEM, its own certificate first) instead of covm's own CA;
    /// read again on SIGHUP.
    #[arg(long, env = "COVM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "COVM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Requests a second each user may make, sustained (its share on each of several replicas).
    #[arg(long, env = "COVM_RATE_LIMIT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit: u32,
    /// Requests a user may make at once after a pause (power, disk and snapshot requests draw 10).
    #[arg(long, env = "COVM_RATE_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: u32,
    /// Requests a second from one address without a session.
    #[arg(long, env = "COVM_ANONYMOUS_RATE_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    anonymous_rate_limit: u32,
    /// Requests at once from one address without a session.
    #[arg(long, env = "COVM_ANONYMOUS_RATE_BURST", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    anonymous_rate_burst: u32,
    /// The master key of encrypted disks (32 bytes) from this file, instead of DATA/master.key (made
    /// at the first start). COVM_MASTER_KEY (base64) gives it from the environment.
    #[arg(long, env = "COVM_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// Single sign-on: the OpenID Connect provider's issuer URL (discovery at
    /// ISSUER/.well-known/openid-configuration).
    #[arg(long, env = "COVM_OIDC_ISSUER", requires = "oidc_client_id")]
    oidc_issuer: Option<String>,
    /// covm's client id at the provider.
    #[arg(long, env = "COVM_OIDC_CLIENT_ID")]
    oidc_client_id: Option<String>,
    /// covm's client secret at the provider (better from COVM_OIDC_CLIENT_SECRET than on a command line).
    #[arg(long, env = "COVM_OIDC_CLIENT_SECRET", hide_env_values = true)]
    oidc_client_secret: Option<String>,
    /// The ID token claim that lists the user's groups.
    #[arg(long, env = "COVM_OIDC_GROUPS_CLAIM", default_value = "groups")]
    oidc_groups_claim: String,
    /// IdP groups mapped to covm groups: IDP=COVM, comma-separated.
    #[arg(long, env = "COVM_OIDC_GROUP_MAP", value_delimiter = ',')]
    oidc_group_map: Vec<String>,
    /// Where the provider sends browsers back (default: the advertised URL + /api/v1/sso/callback).
    #[arg(long, env = "COVM_OIDC_REDIRECT_URL")]
    oidc_redirect_url: Option<String>,
    /// An ID token claim that, when true, says the user is disabled at the provider: covm disables it
    /// too (its sessions and API tokens end) at that sign-in.
    #[arg(long, env = "COVM_OIDC_DISABLED_CLAIM")]
    oidc_disabled_claim: Option<String>,
    /// The lowest TLS version served: 1.3 (the default) or 1.2.
    #[arg(long, env = "COVM_TLS_MIN", default_value = "1.3", value_parser = ["1.2", "1.3"])]
    tls_min: String,
}

#[derive(Subcommand)]
enum FolderCmd {
    /// Create a folder, e.g. /team-a/x.
    Create { path: String },
    /// Delete an empty folder.
    Rm { path: String },
    /// All folders I may view.
    Ls,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user (password from --password-file, COVM_PASSWORD, or a prompt).
    Create {
        name: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    Ls,
    /// Set a user's password (one's own, or anyone's with Users.Manage).
    Passwd {
        name: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    Rm {
        name: String,
    },
    /// Two-factor sign-in (TOTP) of a user (default: oneself).
    #[command(subcommand)]
    Mfa(MfaCmd),
}

#[derive(Subcommand)]
enum MfaCmd {
    /// Begin: prints the secret, its otpauth:// URL and ten recovery codes (shown once).
    Enroll { name: Option<String> },
    /// Turn it on with a current code from the authenticator app.
    Confirm {
        code: String,
        #[arg(long)]
        user: Option<String>,
    },
    /// Turn it off: with a current code, or without one as holder of Permissions.Modify.
    Disable {
        #[arg(long)]
        code: Option<String>,
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Wrap every encrypted disk's key again under a new master key (no image changes).
    Rotate,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Show, or set with --required-for, which groups must use two-factor sign-in.
    Mfa {
        /// Groups, comma-separated (an empty string: none).
        #[arg(long, value_delimiter = ',')]
        required_for: Option<Vec<String>>,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    Create {
        name: String,
    },
    /// Add a user to a group.
    Add {
        group: String,
        user: String,
    },
    Ls,
}

#[derive(Subcommand)]
enum RoleCmd {
    /// Create a role from privileges (repeat -p, or separate with commas).
    Create {
        name: String,
        #[arg(short, long = "privilege", value_delimiter = ',')]
        privileges: Vec<String>,
    },
    Ls,
    Show {
        name: String,
    },
}

#[derive(Subcommand)]
enum PermissionCmd {
    /// Grant ROLE to PRINCIPAL (a user, or group:NAME) on OBJECT (a path, an id, or kind:name).
    Grant {
        principal: String,
        role: String,
        object: String,
        /// The grant applies to the object only, not to what is below it.
        #[arg(long)]
        no_propagate: bool,
        /// Only on objects with this annotation (KEY=VALUE; repeat for several).
        #[arg(long = "if-annotation", value_name = "KEY=VALUE")]
        if_annotation: Vec<String>,
        /// Only for requests from this network (repeat for several).
        #[arg(long = "if-source", value_name = "CIDR")]
        if_source: Vec<String>,
        /// Only within these hours, UTC (`08-18`).
        #[arg(long = "if-hours", value_name = "HH-HH")]
        if_hours: Option<String>,
        /// Only until this time (RFC 3339, e.g. 2027-01-31T18:00:00Z).
        #[arg(long)]
        expires: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Revoke a grant by its id.
    Revoke { id: String },
    Ls {
        #[arg(long)]
        object: Option<String>,
        #[arg(long)]
        principal: Option<String>,
    },
}

#[derive(Subcommand)]
enum InventoryCmd {
    Hosts,
    Datastores,
    Networks,
    Pools,
}

#[derive(Args)]
struct AuditArgs {
    #[command(subcommand)]
    verify: Option<AuditCmd>,
    #[arg(long)]
    actor: Option<String>,
    /// A kind, or a prefix ending in '.' (authz.).
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    object: Option<uuid::Uuid>,
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    #[arg(long)]
    after: Option<i64>,
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Recompute the hash chain of the log.
    Verify,
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>().and_then(|c| c.status()) {
        Some(404) => 3,
        Some(401 | 403) => 4,
        Some(409 | 412 | 423) => 5,
        Some(400 | 413) => 6,
        Some(429 | 503) => 7,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("covm: could not start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::Api { status, error, .. }) => {
                    let field = error.field.as_deref().map(|f| format!(", field {f}")).unwrap_or_default();
                    eprintln!("covm: {} ({status} {}{field})", error.message, error.code);
                }
                _ => eprintln!("covm: {e:#}"),
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn read_password(file: Option<&PathBuf>, prompt: &str) -> anyhow::Result<String> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f).with_context(|| format!("could not read {}", f.display()))?;
        return Ok(s.lines().next().unwrap_or_default().to_owned());
    }
    if let Ok(p) = std::env::var("COVM_PASSWORD") {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    Ok(rpassword::prompt_password(prompt)?)
}

/// A client for `url` that trusts what the user chose: `--ca-file`, the CA trusted for this server at
/// `covm login` (known_servers.json), or the system's roots.
fn connect(url: &str, ca_file: Option<&PathBuf>) -> anyhow::Result<Client> {
    if let Some(f) = ca_file {
        let pem = std::fs::read_to_string(f).with_context(|| format!("could not read {}", f.display()))?;
        return Client::with_ca(url, &pem).with_context(|| format!("{} cannot be trusted as a CA", f.display()));
    }
    if url.starts_with("https://")
        && let Some(k) = creds::known_load()?.servers.get(&creds::origin(url)?)
    {
        return Ok(Client::with_ca(url, &k.ca_pem)?);
    }
    Ok(Client::new(url))
}

/// For `covm login`: a client for `url`; an https:// server whose CA is not trusted yet is probed, its
/// CA's fingerprint shown, and the CA trusted for this server (known_servers.json) when the user says
/// so or `--trust` names that fingerprint.
async fn connect_trusting(
    url: &str,
    ca_file: Option<&PathBuf>,
    trust: Option<&str>,
    out: &Out,
) -> anyhow::Result<Client> {
    let c = connect(url, ca_file)?;
    if !url.starts_with("https://") || ca_file.is_some() {
        return Ok(c);
    }
    let known = creds::known_load()?;
    let origin = creds::origin(url)?;
    let probe = c.health().await;
    let Err(covm_client::ClientError::Transport(why)) = &probe else { return Ok(c) };
    if !why.contains("certificate") && !why.contains("UnknownIssuer") {
        bail!("could not reach {url}: {why}");
    }
    if let Some(k) = known.servers.get(&origin) {
        bail!(
            "{url} presents a certificate that the CA you trusted for it (SHA-256 {}) did not sign: it may be \
             another server. If its CA was replaced on purpose, remove {origin} from {} and sign in again",
            k.fingerprint,
            creds::known_file()?.display()
        );
    }
    let chain = covm_client::tls::server_chain(url).await.map_err(|e| anyhow::anyhow!(e))?;
    let ca = chain.last().expect("a chain is not empty");
    let fingerprint = covm_client::tls::fingerprint(ca);
    let ok = match trust {
        Some(t) if t.eq_ignore_ascii_case(&fingerprint) => true,
        Some(t) => bail!("{url}'s CA has the SHA-256 fingerprint {fingerprint}, not {t}: not trusted"),
        None => {
            eprintln!(
                "{url} uses a certificate authority you have not trusted yet.\n  SHA-256 fingerprint: {fingerprint}\n\
                 Compare it with the one `covm serve` logged (\"serving TLS\") before you go on."
            );
            eprint!("Trust this CA for {origin}? [y/N] ");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
        }
    };
    if !ok {
        bail!("not trusted: nothing was sent to {url}");
    }
    let ca_pem = covm_client::tls::pem(ca);
    let c = Client::with_ca(url, &ca_pem)?;
    c.health().await.with_context(|| format!("{url} is not reachable with the CA it presented"))?;
    let mut known = known;
    known.servers.insert(origin.clone(), creds::KnownServer { fingerprint: fingerprint.clone(), ca_pem });
    let f = creds::known_save(&known)?;
    out.message(&format!("trusted the CA {fingerprint} for {origin} (in {})", f.display()));
    Ok(c)
}

/// A client signed in with the stored (or `COVM_TOKEN`) token, trusting what [`connect`] trusts.
fn client_with(url: &str, ca_file: Option<&PathBuf>) -> anyhow::Result<Client> {
    let c = connect(url, ca_file)?;
    if let Ok(t) = std::env::var("COVM_TOKEN") {
        return Ok(c.with_token(t));
    }
    match creds::load()? {
        Some(cr) => Ok(c.with_token(cr.token)),
        None => bail!("not signed in: run `covm login` first"),
    }
}

/// `/team-a/x` → (`/team-a`, `x`).
fn split_path(path: &str) -> anyhow::Result<(String, String)> {
    let p = path.trim_end_matches('/');
    let Some((parent, name)) = p.rsplit_once('/') else {
        bail!("a folder path starts with / (like /team-a/x)");
    };
    Ok((if parent.is_empty() { "/".into() } else { parent.into() }, name.into()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Out { json: cli.json };
    match cli.command {
        Command::Serve(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
                )
                .init();
            let driver = if a.driver == "sim" { covm_server::Driver::Sim } else { covm_server::Driver::Qemu };
            let oidc = match (&a.oidc_issuer, &a.oidc_client_id) {
                (Some(issuer), Some(client_id)) => {
                    let mut group_map = std::collections::BTreeMap::new();
                    for m in a.oidc_group_map.iter().filter(|m| !m.is_empty()) {
                        let (idp, covm) =
                            m.split_once('=').with_context(|| format!("--oidc-group-map takes IDP=COVM, not {m}"))?;
                        group_map.insert(idp.to_owned(), covm.to_owned());
                    }
                    Some(covm_server::app::sso::OidcConfig {
                        issuer: issuer.clone(),
                        client_id: client_id.clone(),
                        client_secret: covm_server::Hidden(a.oidc_client_secret.clone().unwrap_or_default()),
                        groups_claim: a.oidc_groups_claim.clone(),
                        group_map,
                        redirect_url: a.oidc_redirect_url.clone(),
                        disabled_claim: a.oidc_disabled_claim.clone(),
                    })
                }
                _ => None,
            };
            covm_server::serve(covm_server::ServeConfig {
                demo: a.demo,
                driver,
                db: a.db,
                advertise: a.advertise,
                max_connections: a.max_connections,
                safety_snapshot_days: a.safety_snapshot_days,
                presence_ttl: std::time::Duration::from_secs(a.presence_ttl_s),
                netns: a.netns,
                tls: match (a.tls, a.no_tls) {
                    (true, _) => covm_server::TlsMode::On,
                    (_, true) => covm_server::TlsMode::Off,
                    _ => covm_server::TlsMode::Auto,
                },
                tls_settings: covm_server::tls::TlsSettings {
                    cert: a.tls_cert,
                    key: a.tls_key,
                    min: if a.tls_min == "1.2" { covm_server::tls::TlsMin::V12 } else { covm_server::tls::TlsMin::V13 },
                },
                insecure_http: a.insecure_http,
                rate_limits: covm_server::app::ratelimit::RateLimitConfig {
                    per_second: a.rate_limit,
                    burst: a.rate_burst,
                    anonymous_per_second: a.anonymous_rate_limit,
                    anonymous_burst: a.anonymous_rate_burst,
                },
                master_key_file: a.master_key_file,
                oidc,
                master_key_env: std::env::var("COVM_MASTER_KEY").ok().map(covm_server::Hidden),
                ..covm_server::ServeConfig::new(a.data_dir, a.listen)
            })
            .await
        }
        Command::Login { sso: true, trust, .. } => {
            let anon = connect_trusting(&cli.url, cli.ca_file.as_ref(), trust.as_deref(), &out).await?;
            let start = anon.sso_device_start().await?;
            eprintln!(
                "To sign in, open {} and enter the code {}{}",
                start.verification_uri,
                start.user_code,
                start.verification_uri_complete.as_deref().map(|u| format!("\n(or open {u})")).unwrap_or_default()
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(start.expires_in_s);
            let t = loop {
                tokio::time::sleep(std::time::Duration::from_secs(start.interval_s)).await;
                let p = anon.sso_device_poll(start.id).await?;
                if let Some(t) = p.session {
                    break t;
                }
                if std::time::Instant::now() > deadline {
                    bail!("the code expired before it was entered; run covm login --sso again");
                }
            };
            let f = creds::save(&creds::Credentials { url: cli.url.clone(), user: t.user.clone(), token: t.token })?;
            out.message(&format!("signed in as {} until {} (token in {})", t.user, t.expires_at, f.display()));
            Ok(())
        }
        Command::Login { user, password_file, trust, totp, recovery_code, .. } => {
            let anon = connect_trusting(&cli.url, cli.ca_file.as_ref(), trust.as_deref(), &out).await?;
            let password = read_password(password_file.as_ref(), &format!("password for {user}: "))?;
            let mut p =
                covm_types::api::SessionCreate { user: user.clone(), password, totp, recovery_code, cookie: false };
            let t = match anon.login_with(&p).await {
                Err(e) if e.code() == Some(covm_types::ErrorCode::MfaRequired) => {
                    eprint!("two-factor code for {user}: ");
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    p.totp = Some(line.trim().to_owned());
                    anon.login_with(&p).await?.1
                }
                r => r?.1,
            };
            if t.enroll_only {
                eprintln!(
                    "a policy requires two-factor sign-in of {user}: this session may only enroll \
                     (`covm user mfa enroll`, then `covm user mfa confirm CODE`)"
                );
            }
            let f = creds::save(&creds::Credentials { url: cli.url.clone(), user: t.user.clone(), token: t.token })?;
            out.message(&format!("signed in as {} until {} (token in {})", t.user, t.expires_at, f.display()));
            Ok(())
        }
        Command::Logout => {
            if let Ok(c) = client_with(&cli.url, cli.ca_file.as_ref()) {
                // The token may have expired already; forgetting it is what matters.
                let _ = c.logout().await;
            }
            creds::remove()?;
            out.message("signed out");
            Ok(())
        }
        Command::Whoami { object } => {
            out.whoami(&client_with(&cli.url, cli.ca_file.as_ref())?.whoami(object.as_deref()).await?)
        }
        Command::Ls { path } => out.objects(&client_with(&cli.url, cli.ca_file.as_ref())?.ls(path.as_deref()).await?),
        Command::Folder(cmd) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            match cmd {
                FolderCmd::Create { path } => {
                    let (parent, name) = split_path(&path)?;
                    out.folder(&c.folder_create(&name, &parent).await?)
                }
                FolderCmd::Rm { path } => {
                    // The API deletes by id: find the folder's id from its path first.
                    let who = c.whoami(Some(&path)).await?;
                    c.folder_delete(&who.object.id.to_string()).await?;
                    out.message(&format!("deleted {path}"));
                    Ok(())
                }
                FolderCmd::Ls => out.folders(&c.folders().await?.items),
            }
        }
        Command::User(cmd) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            match cmd {
                UserCmd::Create { name, password_file } => {
                    let pw = read_password(password_file.as_ref(), &format!("password for {name}: "))?;
                    out.user(&c.user_create(&name, &pw).await?)
                }
                UserCmd::Ls => out.users(&c.users().await?),
                UserCmd::Passwd { name, password_file } => {
                    let pw = read_password(password_file.as_ref(), &format!("new password for {name}: "))?;
                    c.user_password_set(&name, &pw).await?;
                    out.message(&format!("password of {name} changed; its other sessions have ended"));
                    Ok(())
                }
                UserCmd::Rm { name } => {
                    c.user_delete(&name).await?;
                    out.message(&format!("deleted user {name}"));
                    Ok(())
                }
                UserCmd::Mfa(m) => {
                    let me = || -> anyhow::Result<String> {
                        creds::load()?.map(|c| c.user).context("name the user (not signed in)")
                    };
                    match m {
                        MfaCmd::Enroll { name } => {
                            let name = match name {
                                Some(n) => n,
                                None => me()?,
                            };
                            let e = c.mfa_enroll(&name).await?;
                            if out.json {
                                println!("{}", serde_json::to_string_pretty(&e)?);
                            } else {
                                println!("secret:         {}", e.secret);
                                println!("otpauth URL:    {}", e.otpauth_url);
                                println!("recovery codes: {}", e.recovery_codes.join(" "));
                                println!(
                                    "Add the secret to an authenticator app, keep the recovery codes somewhere safe,"
                                );
                                println!("then turn it on: covm user mfa confirm CODE");
                            }
                            Ok(())
                        }
                        MfaCmd::Confirm { code, user } => {
                            let name = match user {
                                Some(n) => n,
                                None => me()?,
                            };
                            c.mfa_confirm(&name, &code).await?;
                            out.message(&format!("two-factor sign-in is on for {name}"));
                            Ok(())
                        }
                        MfaCmd::Disable { code, user } => {
                            let name = match user {
                                Some(n) => n,
                                None => me()?,
                            };
                            c.mfa_disable(&name, code.as_deref()).await?;
                            out.message(&format!("two-factor sign-in is off for {name}"));
                            Ok(())
                        }
                    }
                }
            }
        }
        Command::Group(cmd) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            match cmd {
                GroupCmd::Create { name } => out.groups(&[c.group_create(&name).await?]),
                GroupCmd::Add { group, user } => out.groups(&[c.group_member_add(&group, &user).await?]),
                GroupCmd::Ls => out.groups(&c.groups().await?),
            }
        }
        Command::Role(cmd) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            match cmd {
                RoleCmd::Create { name, privileges } => {
                    let privs = privileges
                        .iter()
                        .map(|p| p.trim().parse::<Privilege>().map_err(|e| anyhow::anyhow!(e)))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    out.role(&c.role_create(&name, &privs).await?)
                }
                RoleCmd::Ls => out.roles(&c.roles().await?),
                RoleCmd::Show { name } => out.role(&c.role(&name).await?),
            }
        }
        Command::Permission(cmd) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            match cmd {
                PermissionCmd::Grant {
                    principal,
                    role,
                    object,
                    no_propagate,
                    if_annotation,
                    if_source,
                    if_hours,
                    expires,
                } => {
                    let annotations = if_annotation
                        .iter()
                        .map(|a| match a.split_once('=') {
                            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
                            None => Err(anyhow::anyhow!("--if-annotation takes KEY=VALUE, not {a}")),
                        })
                        .collect::<anyhow::Result<_>>()?;
                    let conditions = covm_types::conditions::GrantConditions {
                        annotations,
                        source_cidrs: if_source,
                        hours_utc: if_hours,
                        expires_at: expires,
                    };
                    let conditions = (!conditions.is_empty()).then_some(conditions);
                    out.permissions(&[c
                        .permission_grant_if(&principal, &role, &object, !no_propagate, conditions)
                        .await?])
                }
                PermissionCmd::Revoke { id } => {
                    c.permission_revoke(&id).await?;
                    out.message(&format!("revoked {id}"));
                    Ok(())
                }
                PermissionCmd::Ls { object, principal } => {
                    out.permissions(&c.permissions(&PermissionQuery { object, principal }).await?)
                }
            }
        }
        Command::Keys(KeysCmd::Rotate) => {
            let r = client_with(&cli.url, cli.ca_file.as_ref())?.keys_rotate().await?;
            match out.json {
                true => println!("{}", serde_json::to_string_pretty(&r)?),
                false => {
                    out.message(&format!("rotated: {} disk keys wrapped under master key {}", r.disks, r.master_key))
                }
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::Mfa { required_for }) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            let p = match required_for {
                Some(groups) => {
                    let groups: Vec<&str> = groups.iter().map(String::as_str).filter(|g| !g.is_empty()).collect();
                    c.mfa_policy_set(&groups).await?
                }
                None => c.mfa_policy().await?,
            };
            match out.json {
                true => println!("{}", serde_json::to_string_pretty(&p)?),
                false => out.message(&format!(
                    "two-factor sign-in required for: {}",
                    if p.required_for.is_empty() { "nobody".to_owned() } else { p.required_for.join(", ") }
                )),
            }
            Ok(())
        }
        Command::Vm(cmd) => vm::run(&client_with(&cli.url, cli.ca_file.as_ref())?, &out, cmd).await,
        Command::Disk(cmd) => disk::run(&client_with(&cli.url, cli.ca_file.as_ref())?, &out, cmd).await,
        Command::Datastore(cmd) => datastore::run(&client_with(&cli.url, cli.ca_file.as_ref())?, &out, cmd).await,
        Command::Network(cmd) => network::run(&client_with(&cli.url, cli.ca_file.as_ref())?, &out, cmd).await,
        Command::Inventory(cmd) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            let q = covm_types::api::ListQuery { limit: Some(1000), ..Default::default() };
            let items = match cmd {
                InventoryCmd::Hosts => values(c.hosts(&q).await?.items),
                InventoryCmd::Datastores => values(c.datastores(&q).await?.items),
                InventoryCmd::Networks => values(c.networks(&q).await?.items),
                InventoryCmd::Pools => values(c.pools(&q).await?.items),
            };
            out.values(&items)
        }
        Command::Events { follow, after, limit } => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            if follow {
                let mut cursor = after;
                loop {
                    let mut stream = c.events_follow(cursor, None).await?;
                    while let Some(ev) = stream.next().await {
                        match ev {
                            Ok(ev) => {
                                cursor = Some(ev.seq);
                                print_events(&out, std::slice::from_ref(&ev))?;
                            }
                            Err(e) => {
                                eprintln!("covm: {e}; reconnecting");
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            // TODO-perf: without --after this pages through the whole feed to print its tail; the API
            // could offer "the newest N" instead.
            let mut page = c.events(&EventQuery { after, limit: Some(1000), object: None }).await?;
            while let Some(next) = page.next.clone() {
                let more = c.events(&EventQuery { after: next.parse().ok(), limit: Some(1000), object: None }).await?;
                page.items.extend(more.items);
                page.next = more.next;
            }
            let skip = page.items.len().saturating_sub(limit as usize);
            print_events(&out, &page.items[skip..])
        }
        Command::Audit(a) => {
            let c = client_with(&cli.url, cli.ca_file.as_ref())?;
            if a.verify.is_some() {
                let v = c.audit_verify().await?;
                out.verify(&v)?;
                if !v.ok {
                    bail!("the audit log is broken at sequence number {}", v.broken_seq.unwrap_or_default());
                }
                return Ok(());
            }
            let q = AuditQuery {
                actor: a.actor,
                object: a.object,
                kind: a.kind,
                since: a.since,
                until: None,
                after: a.after,
                limit: Some(a.limit.clamp(1, 1000)),
            };
            print_events(&out, &c.audit(&q).await?.items)
        }
    }
}

/// Typed views as JSON values, for the generic table printer.
fn values<T: serde::Serialize>(items: Vec<T>) -> Vec<serde_json::Value> {
    items.into_iter().map(|v| serde_json::to_value(v).unwrap_or_default()).collect()
}
