//! The `lode` command: turns arguments into `lode_client::Client` calls and prints the results.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lode_client::{certs, human, Client, ClientConfig, Error, PutOptions};
use lode_protocol::messages::{EntryKind, FileStatus, NamenodeChange, NamenodeReport};
use serde_json::{json, Value};

/// Lode: a distributed block filesystem that moves computation to the data.
#[derive(Parser)]
#[command(name = "lode", version)]
struct Cli {
    /// Client config file (else $LODE_CONFIG, else ~/.config/lode/client.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy local files (or - for stdin) into Lode: LOCAL... REMOTE.
    Put {
        /// Overwrite existing files.
        #[arg(short, long)]
        force: bool,
        /// Copy directories and everything under them.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Files in flight at once.
        #[arg(short = 't', long, default_value_t = 4)]
        threads: usize,
        /// Replica count for the new files.
        #[arg(long)]
        replication: Option<u8>,
        /// Block size: a power of two from 64K to 1G (e.g. 128M).
        #[arg(long, value_parser = human::parse_size)]
        block_size: Option<u64>,
        /// Local files (or - for stdin), then the destination (an existing directory receives
        /// each under its own name; with several sources it must be one).
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
    },
    /// Copy files out of Lode: REMOTE... LOCAL (or - for stdout).
    Get {
        /// Overwrite existing local files.
        #[arg(short, long)]
        force: bool,
        /// Copy directories and everything under them.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Files in flight at once.
        #[arg(short = 't', long, default_value_t = 4)]
        threads: usize,
        /// Paths in Lode, then the local destination (an existing directory receives each under
        /// its own name; with several sources it must be one).
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
    },
    /// Print the first kilobyte of a file.
    Head {
        /// Path in Lode.
        path: String,
    },
    /// Print the last kilobyte of a file; with -f, then whatever it grows by (checked every second).
    Tail {
        /// Keep printing what is added.
        #[arg(short = 'f')]
        follow: bool,
        /// Path in Lode.
        path: String,
    },
    /// Set a file's modification time to now, creating it empty where there is none.
    Touch {
        /// Paths in Lode.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Exit 0 if the path exists (-e), is a directory (-d) or is a file (-f), else 1; prints nothing.
    Test {
        /// Exists.
        #[arg(short = 'e', group = "what")]
        exists: bool,
        /// Is a directory.
        #[arg(short = 'd', group = "what")]
        dir: bool,
        /// Is a file.
        #[arg(short = 'f', group = "what")]
        file: bool,
        /// Path in Lode.
        path: String,
    },
    /// Concatenate the files in a directory (in name order) into one local file.
    Getmerge {
        /// Add a newline after each file (`-nl`, as in HDFS, or `--nl`).
        #[arg(long = "nl")]
        nl: bool,
        /// Directory in Lode.
        remote: String,
        /// Local file.
        local: String,
    },
    /// Print files to stdout.
    Cat {
        /// Paths in Lode.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// List a directory.
    Ls {
        /// List subdirectories too.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Show mode, owner and group.
        #[arg(short = 'l')]
        long: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Directory or file (default /).
        path: Option<String>,
    },
    /// Create directories.
    Mkdir {
        /// Create missing parents; no error if it exists.
        #[arg(short, long)]
        parents: bool,
        /// Directories to create.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Delete files or directories: into the trash (`/user/<name>/.Trash/Current/<path>`) unless
    /// --skip-trash.
    Rm {
        /// Delete directories and everything under them.
        #[arg(short, long)]
        recursive: bool,
        /// Delete at once instead of moving to the trash.
        #[arg(long)]
        skip_trash: bool,
        /// Paths to delete.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Move or rename.
    Mv {
        /// Source path.
        src: String,
        /// Destination (an existing directory receives the entry under its own name).
        dst: String,
    },
    /// Show an entry's details.
    Stat {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Include blocks and their locations.
        #[arg(long)]
        blocks: bool,
        /// Path in Lode.
        path: String,
    },
    /// Show space used.
    Du {
        /// One summary line for the path instead of one line per entry.
        #[arg(short, long)]
        summary: bool,
        /// Path in Lode (default /).
        path: Option<String>,
    },
    /// Empty your trash.
    Expunge,
    /// Change the mode of entries: octal (640) or symbolic (g+w, u=rwx,go=rx, +t).
    Chmod {
        /// Change everything under directories too.
        #[arg(short = 'R')]
        recursive: bool,
        /// The mode.
        mode: String,
        /// Paths in Lode.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Change the owner and optionally the group of entries (superusers only).
    Chown {
        /// Change everything under directories too.
        #[arg(short = 'R')]
        recursive: bool,
        /// OWNER, OWNER:GROUP or :GROUP.
        owner: String,
        /// Paths in Lode.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Change the group of entries (their owner may give them to a group the owner is in).
    Chgrp {
        /// Change everything under directories too.
        #[arg(short = 'R')]
        recursive: bool,
        /// The group.
        group: String,
        /// Paths in Lode.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Count the directories, files and bytes under a path; with -q, its quotas and their use.
    Count {
        /// Show quotas.
        #[arg(short = 'q')]
        quotas: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Path in Lode.
        path: String,
    },
    /// Change the target replica count of a file or of every file under a directory.
    Setrep {
        /// Replica count (1..=7).
        replication: u8,
        /// File or directory.
        path: String,
    },
    /// Block health of a file or of every file under a directory (exit 1 if any block is missing
    /// or corrupt).
    Fsck {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// File or directory.
        path: String,
    },
    /// Print a file's BLAKE3 hash (as b3sum prints it), merged from block values.
    Checksum {
        /// Paths in Lode.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Run a plugin over files where their blocks lie and print the combined result.
    Scan {
        /// A plugin library file (added if new), a registered name, or a hash.
        #[arg(long)]
        plugin: String,
        /// A plugin argument (repeatable).
        #[arg(long = "arg", value_name = "K=V", value_parser = parse_kv)]
        args: Vec<(String, String)>,
        /// Print JSON: {"result", "stats"}.
        #[arg(long)]
        json: bool,
        /// Files or directories (every file under a directory).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Plugins: add, list, approve.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Certificates for a cluster.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Cluster administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Store a plugin library in Lode under its BLAKE3 hash and register it (approved at once
    /// when an admin adds it).
    Add {
        /// The shared library.
        file: PathBuf,
        /// Register under this name instead of the plugin's own.
        #[arg(long)]
        name: Option<String>,
    },
    /// List registered plugins.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a plugin (admin only).
    Approve {
        /// The plugin's hash.
        hash: String,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster CA and certificates for the namenode, datanodes, an admin and a user.
    Init(CertsInit),
    /// Issue one more certificate with an existing CA (a new datanode, user or admin).
    Issue {
        /// Directory holding ca.pem and ca-key.pem (from `certs init`); the new files go there too.
        #[arg(long)]
        dir: PathBuf,
        /// Name (CN): the datanode's name (dn-4), the namenode group member's (nn-2) or the user's.
        #[arg(long)]
        name: String,
        /// Role: datanode, user, admin, or namenode (a member of a namenode group, nn-2).
        #[arg(long, value_parser = ["datanode", "user", "admin", "namenode"])]
        role: String,
    },
    /// Renew a certificate before it expires (they last a year): a fresh key and certificate for
    /// the same name and role, signed by the CA in --dir; the old pair is kept as *.old. Restart
    /// the server (or point the client) at the new files.
    Renew {
        /// Directory holding ca.pem, ca-key.pem and NAME.pem.
        #[arg(long)]
        dir: PathBuf,
        /// Name of the certificate to renew (namenode, dn-1, admin, a user's name).
        #[arg(long)]
        name: String,
    },
    /// Print a certificate's SHA-256 fingerprint, the form `[tls] deny` lists to shut it out.
    Fingerprint {
        /// A PEM certificate file.
        file: PathBuf,
    },
}

#[derive(Args)]
struct CertsInit {
    /// Directory to write the PEM files to.
    #[arg(long)]
    dir: PathBuf,
    /// Number of datanode certificates (dn-1..dn-N).
    #[arg(long, default_value_t = 3)]
    datanodes: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SafeModeArg {
    Get,
    Enter,
    Leave,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Write a consistent backup of the namenode's metadata to FILE (restore it with
    /// `lode-namenode --config CONFIG --restore-from FILE` into an empty meta_dir).
    Backup {
        /// Where to write the backup.
        file: PathBuf,
    },
    /// Drain a datanode: its blocks gain replicas elsewhere while it still serves reads; it is
    /// decommissioned when nothing the cluster needs is only there.
    Decommission {
        /// Datanode name (dn-2).
        datanode: String,
    },
    /// Undo a decommission.
    Recommission {
        /// Datanode name.
        datanode: String,
    },
    /// Read or change safe mode (namespace changes are refused while it is on).
    Safemode {
        /// get, enter or leave.
        action: SafeModeArg,
    },
    /// Capacity, datanodes and block health.
    Report {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the namenode read the groups from its config file again.
    RefreshGroups,
    /// Directory quotas: the most names (files and directories) and bytes (times replication).
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
    /// The namenode group: its members, and changes of membership.
    Namenode {
        #[command(subcommand)]
        command: NamenodeCommand,
    },
}

#[derive(Subcommand)]
enum NamenodeCommand {
    /// Each member's role, term, last log index, applied index and lag.
    List {
        /// Print JSON (the `namenodes` array of `admin report --json`).
        #[arg(long)]
        json: bool,
    },
    /// Add a namenode to the group: it catches up as a learner, then votes. Start it first, with
    /// `join = true` and its id in its `[group]` section.
    Add {
        /// The new member's id (never one a member had before).
        #[arg(long)]
        id: u64,
        /// The name of its certificate (nn-4).
        name: String,
        /// Its QUIC address, host:port.
        addr: String,
    },
    /// Remove a member from the group (stop its process afterwards).
    Remove {
        /// The member's certificate name.
        name: String,
    },
}

#[derive(Subcommand)]
enum QuotaCommand {
    /// Set a directory's quotas (a limit not given keeps its value).
    Set {
        /// Most files and directories under it, itself included.
        #[arg(long)]
        names: Option<u64>,
        /// Most bytes stored under it, counting every replica (e.g. 10G).
        #[arg(long, value_parser = human::parse_size)]
        bytes: Option<u64>,
        /// The directory.
        path: String,
    },
    /// Remove a directory's quotas.
    Clear {
        /// The directory.
        path: String,
    },
}

fn main() -> ExitCode {
    // `getmerge -nl`, as `hdfs dfs` spells it (clap's short flags are one letter).
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(at) = args.iter().position(|a| a == "getmerge") {
        for a in &mut args[at + 1..] {
            if a == "-nl" {
                *a = "--nl".into();
            }
        }
    }
    let cli = Cli::parse_from(args);
    lode_protocol::service::init_logging("error");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lode: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (name, result) = runtime.block_on(dispatch(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Local { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("lode: {name}: {msg}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> (&'static str, Result<(), Error>) {
    let config = cli.config.clone();
    match cli.command {
        Command::Certs {
            command: CertsCommand::Init(args),
        } => ("certs init", certs_init(args)),
        Command::Certs {
            command: CertsCommand::Issue { dir, name, role },
        } => ("certs issue", {
            let role =
                lode_protocol::net::Role::parse(&role).unwrap_or(lode_protocol::net::Role::User);
            certs::issue(&dir, &name, role)
                .map(|_| println!("wrote {name}.pem and {name}-key.pem to {}", dir.display()))
        }),
        Command::Certs {
            command: CertsCommand::Fingerprint { file },
        } => ("certs fingerprint", {
            certs::fingerprint(&file).map(|f| println!("{f}  {}", file.display()))
        }),
        Command::Certs {
            command: CertsCommand::Renew { dir, name },
        } => ("certs renew", {
            certs::renew(&dir, &name).map(|role| {
                println!(
                    "renewed {name} ({}) for {} days: {name}.pem and {name}-key.pem in {} (the old pair is *.old)",
                    role.as_str(),
                    certs::LEAF_DAYS,
                    dir.display()
                )
            })
        }),
        Command::Put {
            force,
            recursive,
            threads,
            replication,
            block_size,
            mut paths,
        } => (
            "put",
            with_client(config, |c| async move {
                let remote = paths.pop().unwrap_or_default();
                let opts = PutOptions {
                    overwrite: force,
                    replication,
                    block_size,
                };
                if paths.len() == 1 && !recursive {
                    let local = paths.remove(0);
                    return put(c, opts, local, remote).await;
                }
                put_many(c, opts, recursive, threads, paths, remote).await
            })
            .await,
        ),
        Command::Get {
            force,
            recursive,
            threads,
            mut paths,
        } => (
            "get",
            with_client(config, |c| async move {
                let local = paths.pop().unwrap_or_default();
                let globbed = paths.iter().any(|p| lode_client::bulk::is_glob(p));
                if paths.len() == 1 && !recursive && !globbed {
                    let remote = paths.remove(0);
                    return get(c, force, remote, local).await;
                }
                let sources = expand_all(&c, &paths).await?;
                get_many(c, force, recursive, threads, sources, local).await
            })
            .await,
        ),
        Command::Cat { paths } => ("cat", with_client(config, |c| cat(c, paths)).await),
        Command::Head { path } => (
            "head",
            with_client(config, |c| async move {
                let st = c.stat(&path, true).await?;
                let mut out = tokio::io::stdout();
                c.get_range(&st, 0, 1024, &mut out, &|_| {})
                    .await
                    .map(|_| ())
            })
            .await,
        ),
        Command::Tail { follow, path } => {
            ("tail", with_client(config, |c| tail(c, follow, path)).await)
        }
        Command::Touch { paths } => (
            "touch",
            with_client(config, |c| async move {
                for p in paths {
                    match c.try_stat(&p).await? {
                        Some(st) if st.kind == EntryKind::Directory => {
                            return Err(Error::Invalid(format!("{}: is a directory", st.path)))
                        }
                        Some(st) => c.set_times(&st.path, None).await?,
                        None => {
                            c.put(&b""[..], &p, &PutOptions::default(), &|_| {}).await?;
                        }
                    }
                }
                Ok(())
            })
            .await,
        ),
        Command::Test {
            exists,
            dir,
            file,
            path,
        } => {
            let held = with_client(config, |c| async move {
                let st = c.try_stat(&path).await?;
                let yes = match st {
                    None => false,
                    Some(st) if dir => st.kind == EntryKind::Directory,
                    Some(st) if file => st.kind == EntryKind::File,
                    Some(_) => exists || !(dir || file),
                };
                if yes {
                    Ok(())
                } else {
                    Err(Error::Invalid(String::new()))
                }
            })
            .await;
            // Nothing printed: the exit status is the answer.
            std::process::exit(i32::from(held.is_err()));
        }
        Command::Getmerge { nl, remote, local } => (
            "getmerge",
            with_client(config, |c| getmerge(c, nl, remote, local)).await,
        ),
        Command::Ls {
            recursive,
            long,
            json,
            path,
        } => (
            "ls",
            with_client(config, |c| ls(c, recursive, long, json, path)).await,
        ),
        Command::Chmod {
            recursive,
            mode,
            paths,
        } => (
            "chmod",
            with_client(config, |c| async move {
                let change = lode_protocol::perm::parse_mode(&mode).map_err(Error::Invalid)?;
                for p in paths {
                    c.set_mode(&p, change.clone(), recursive).await?;
                }
                Ok(())
            })
            .await,
        ),
        Command::Chown {
            recursive,
            owner,
            paths,
        } => (
            "chown",
            with_client(config, |c| async move {
                let (user, group) = match owner.split_once(':') {
                    Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
                    None => (owner.as_str(), None),
                };
                let user = Some(user).filter(|u| !u.is_empty());
                if user.is_none() && group.is_none() {
                    return Err(Error::Invalid(format!(
                        "{owner:?}: expected OWNER, OWNER:GROUP or :GROUP"
                    )));
                }
                for p in paths {
                    c.set_owner(&p, user, group, recursive).await?;
                }
                Ok(())
            })
            .await,
        ),
        Command::Chgrp {
            recursive,
            group,
            paths,
        } => (
            "chgrp",
            with_client(config, |c| async move {
                for p in paths {
                    c.set_owner(&p, None, Some(&group), recursive).await?;
                }
                Ok(())
            })
            .await,
        ),
        Command::Count { quotas, json, path } => (
            "count",
            with_client(config, |c| count(c, quotas, json, path)).await,
        ),
        Command::Admin {
            command:
                AdminCommand::Quota {
                    command: QuotaCommand::Set { names, bytes, path },
                },
        } => (
            "admin quota set",
            with_client(config, |c| async move {
                c.set_quota(&path, names, bytes, false).await
            })
            .await,
        ),
        Command::Admin {
            command:
                AdminCommand::Quota {
                    command: QuotaCommand::Clear { path },
                },
        } => (
            "admin quota clear",
            with_client(config, |c| async move {
                c.set_quota(&path, None, None, true).await
            })
            .await,
        ),
        Command::Admin {
            command: AdminCommand::RefreshGroups,
        } => (
            "admin refresh-groups",
            with_client(config, |c| async move {
                c.refresh_groups().await?;
                println!("groups reloaded");
                Ok(())
            })
            .await,
        ),
        Command::Mkdir { parents, paths } => (
            "mkdir",
            with_client(config, |c| mkdir(c, parents, paths)).await,
        ),
        Command::Rm {
            recursive,
            skip_trash,
            paths,
        } => (
            "rm",
            with_client(config, |c| rm(c, recursive, skip_trash, paths)).await,
        ),
        Command::Expunge => (
            "expunge",
            with_client(config, |c| async move { c.expunge().await }).await,
        ),
        Command::Mv { src, dst } => ("mv", with_client(config, |c| mv(c, src, dst)).await),
        Command::Stat { json, blocks, path } => (
            "stat",
            with_client(config, |c| stat(c, json, blocks, path)).await,
        ),
        Command::Du { summary, path } => {
            ("du", with_client(config, |c| du(c, summary, path)).await)
        }
        Command::Checksum { paths } => (
            "checksum",
            with_client(config, |c| checksum(c, paths)).await,
        ),
        Command::Admin {
            command: AdminCommand::Namenode { command },
        } => match command {
            NamenodeCommand::List { json } => (
                "admin namenode list",
                with_client(config, |c| namenode_list(c, json)).await,
            ),
            NamenodeCommand::Add { id, name, addr } => (
                "admin namenode add",
                with_client(config, |c| async move {
                    c.change_namenodes(NamenodeChange::Add { id, name, addr })
                        .await
                })
                .await,
            ),
            NamenodeCommand::Remove { name } => (
                "admin namenode remove",
                with_client(config, |c| async move {
                    c.change_namenodes(NamenodeChange::Remove { name }).await
                })
                .await,
            ),
        },
        Command::Admin {
            command: AdminCommand::Decommission { datanode },
        } => (
            "admin decommission",
            with_client(
                config,
                |c| async move { c.decommission(&datanode, true).await },
            )
            .await,
        ),
        Command::Admin {
            command: AdminCommand::Recommission { datanode },
        } => (
            "admin recommission",
            with_client(
                config,
                |c| async move { c.decommission(&datanode, false).await },
            )
            .await,
        ),
        Command::Admin {
            command: AdminCommand::Backup { file },
        } => (
            "admin backup",
            with_client(config, |c| async move {
                let (len, applied) = c.backup(&file).await?;
                println!(
                    "wrote {} ({len} bytes, up to edit {applied})",
                    file.display()
                );
                Ok(())
            })
            .await,
        ),
        Command::Fsck { json, path } => {
            ("fsck", with_client(config, |c| fsck(c, json, path)).await)
        }
        Command::Admin {
            command: AdminCommand::Safemode { action },
        } => (
            "admin safemode",
            with_client(config, |c| safemode(c, action)).await,
        ),
        Command::Setrep { replication, path } => (
            "setrep",
            with_client(
                config,
                |c| async move { c.setrep(&path, replication).await },
            )
            .await,
        ),
        Command::Scan {
            plugin,
            args,
            json,
            paths,
        } => (
            "scan",
            with_client(config, |c| scan(c, plugin, args, json, paths)).await,
        ),
        Command::Plugin { command } => (
            "plugin",
            with_client(config, |c| plugin_cmd(c, command)).await,
        ),
        Command::Admin {
            command: AdminCommand::Report { json },
        } => (
            "admin report",
            with_client(config, |c| report(c, json)).await,
        ),
    }
}

async fn with_client<F, Fut>(config: Option<PathBuf>, f: F) -> Result<(), Error>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let cfg = ClientConfig::locate(config.as_deref())?;
    let client = Client::connect(cfg).await?;
    let close = client.close();
    let result = f(client).await;
    close.await;
    result
}

fn certs_init(args: CertsInit) -> Result<(), Error> {
    let made = certs::init(&args.dir, args.datanodes)?;
    println!(
        "wrote certificates for {} to {}",
        made.join(", "),
        args.dir.display()
    );
    Ok(())
}

fn progress_bar(total: Option<u64>) -> Option<ProgressBar> {
    if !(std::io::stderr().is_terminal() && std::io::stdout().is_terminal()) {
        return None;
    }
    let (pb, template) = match total {
        Some(t) => (
            ProgressBar::new(t),
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
        ),
    };
    pb.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(pb)
}

fn base_name(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

async fn put(c: Client, opts: PutOptions, local: String, remote: String) -> Result<(), Error> {
    let mut target = remote.clone();
    if let Some(st) = c.try_stat(&remote).await? {
        if st.kind == EntryKind::Directory {
            if local == "-" {
                return Err(Error::Invalid(format!(
                    "{remote}: is a directory (name the file to write from stdin)"
                )));
            }
            target = lode_protocol::path::join(&st.path, base_name(&local));
        }
    }
    let bar;
    let written = if local == "-" {
        bar = progress_bar(None);
        let b = bar.clone();
        c.put(tokio::io::stdin(), &target, &opts, &move |n| {
            if let Some(b) = &b {
                b.set_position(n)
            }
        })
        .await?
    } else {
        let meta = std::fs::metadata(&local).map_err(|e| Error::local(&local, e))?;
        if meta.is_dir() {
            return Err(Error::Invalid(format!("{local}: is a directory")));
        }
        let file = tokio::fs::File::open(&local)
            .await
            .map_err(|e| Error::local(&local, e))?;
        bar = progress_bar(Some(meta.len()));
        let b = bar.clone();
        c.put(file, &target, &opts, &move |n| {
            if let Some(b) = &b {
                b.set_position(n)
            }
        })
        .await?
    };
    if let Some(b) = bar {
        b.finish_and_clear();
        eprintln!("{target}: {} written", human::size(written));
    }
    Ok(())
}

async fn get(c: Client, force: bool, remote: String, local: String) -> Result<(), Error> {
    let st = c.stat(&remote, true).await?;
    if st.kind == EntryKind::Directory {
        return Err(Error::Invalid(format!("{}: is a directory", st.path)));
    }
    if local == "-" {
        let mut out = tokio::io::stdout();
        c.get(&st.path, &mut out, &|_| {}).await?;
        return Ok(());
    }
    let mut dest = PathBuf::from(&local);
    if dest.is_dir() {
        dest = dest.join(base_name(&st.path));
    }
    if dest.exists() && !force {
        return Err(Error::Invalid(format!(
            "{}: exists (use -f to overwrite)",
            dest.display()
        )));
    }
    let tmp = temp_beside(&dest);
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| Error::local(&tmp, e))?;
    let bar = progress_bar(Some(st.size));
    let b = bar.clone();
    let result = c
        .get(&st.path, &mut file, &move |n| {
            if let Some(b) = &b {
                b.set_position(n)
            }
        })
        .await;
    drop(file);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dest).map_err(|e| Error::local(&dest, e))?;
    if let Some(b) = bar {
        b.finish_and_clear();
        eprintln!("{}: {} read", dest.display(), human::size(st.size));
    }
    Ok(())
}

use lode_client::bulk::temp_beside;

/// Prints each failed file on a line of its own and a summary line, both on stderr; an error
/// (and so exit 1) if any file failed.
fn summarise(
    what: &str,
    outcomes: Vec<lode_client::Outcome>,
    planned_failures: usize,
    started: std::time::Instant,
) -> Result<(), Error> {
    let mut bytes = 0u64;
    let mut failed = planned_failures;
    let total = outcomes.len() + planned_failures;
    for o in &outcomes {
        match &o.result {
            Ok(n) => bytes += n,
            Err(e) => {
                failed += 1;
                let name = if what == "put" {
                    o.transfer.local.display().to_string()
                } else {
                    o.transfer.remote.clone()
                };
                eprintln!("lode: {what}: {name}: {}", e.to_string().replace('\n', " "));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    eprintln!(
        "{what}: {} of {total} files, {} in {secs:.1} s ({}/s)",
        total - failed,
        human::size(bytes),
        human::size((bytes as f64 / secs) as u64)
    );
    if failed > 0 {
        return Err(Error::Invalid(format!("{failed} of {total} files failed")));
    }
    Ok(())
}

/// Local files and trees into Lode (`put [-r] [-t N] LOCAL... REMOTE`).
async fn put_many(
    c: Client,
    opts: PutOptions,
    recursive: bool,
    threads: usize,
    sources: Vec<String>,
    remote: String,
) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let dest = c.try_stat(&remote).await?;
    let dest_is_dir = dest
        .as_ref()
        .is_some_and(|s| s.kind == EntryKind::Directory);
    if sources.len() > 1 && !dest_is_dir {
        return Err(Error::Invalid(format!(
            "{remote}: not a directory (several sources need one)"
        )));
    }
    let remote = dest.map_or(remote, |s| s.path);
    let mut transfers = vec![];
    let mut dirs = vec![];
    let mut planned_failures = 0;
    for src in &sources {
        let meta = match std::fs::metadata(src) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("lode: put: {src}: {e}");
                planned_failures += 1;
                continue;
            }
        };
        let top = if dest_is_dir {
            lode_protocol::path::join(&remote, base_name(src))
        } else {
            remote.clone()
        };
        if !meta.is_dir() {
            transfers.push(lode_client::Transfer {
                local: PathBuf::from(src),
                remote: top,
            });
            continue;
        }
        if !recursive {
            eprintln!("lode: put: {src}: is a directory (use -r)");
            planned_failures += 1;
            continue;
        }
        let mut stack = vec![(PathBuf::from(src), top)];
        while let Some((local, at)) = stack.pop() {
            dirs.push(at.clone());
            let entries = std::fs::read_dir(&local).map_err(|e| Error::local(&local, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::local(&local, e))?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().to_string();
                let there = lode_protocol::path::join(&at, &name);
                if path.is_dir() {
                    stack.push((path, there));
                } else {
                    transfers.push(lode_client::Transfer {
                        local: path,
                        remote: there,
                    });
                }
            }
        }
    }
    for d in &dirs {
        c.mkdir(d, true).await?;
    }
    let total: u64 = transfers
        .iter()
        .filter_map(|t| std::fs::metadata(&t.local).ok())
        .map(|m| m.len())
        .sum();
    let bar = progress_bar(Some(total));
    let b = bar.clone();
    let outcomes = c
        .put_many(transfers, &opts, threads, &move |n| {
            if let Some(b) = &b {
                b.set_position(n)
            }
        })
        .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    summarise("put", outcomes, planned_failures, started)
}

/// Files and trees out of Lode (`get [-r] [-t N] REMOTE... LOCAL`).
async fn get_many(
    c: Client,
    force: bool,
    recursive: bool,
    threads: usize,
    sources: Vec<String>,
    local: String,
) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let dest = PathBuf::from(&local);
    let dest_is_dir = dest.is_dir();
    if sources.len() > 1 && !dest_is_dir {
        return Err(Error::Invalid(format!(
            "{local}: not a directory (several sources need one)"
        )));
    }
    let mut transfers = vec![];
    let mut planned_failures = 0;
    let mut total = 0u64;
    for src in &sources {
        let st = match c.stat(src, false).await {
            Ok(st) => st,
            Err(e) => {
                eprintln!("lode: get: {src}: {e}");
                planned_failures += 1;
                continue;
            }
        };
        let top = if dest_is_dir {
            dest.join(base_name(&st.path))
        } else {
            dest.clone()
        };
        if st.kind == EntryKind::File {
            total += st.size;
            transfers.push(lode_client::Transfer {
                local: top,
                remote: st.path,
            });
            continue;
        }
        if !recursive {
            eprintln!("lode: get: {}: is a directory (use -r)", st.path);
            planned_failures += 1;
            continue;
        }
        let mut stack = vec![(st.path.clone(), top)];
        while let Some((remote, here)) = stack.pop() {
            std::fs::create_dir_all(&here).map_err(|e| Error::local(&here, e))?;
            for e in c.list(&remote).await? {
                let there = here.join(base_name(&e.path));
                match e.kind {
                    EntryKind::Directory => stack.push((e.path, there)),
                    EntryKind::File => {
                        total += e.size;
                        transfers.push(lode_client::Transfer {
                            local: there,
                            remote: e.path,
                        });
                    }
                }
            }
        }
    }
    let bar = progress_bar(Some(total));
    let b = bar.clone();
    let outcomes = c
        .get_many(transfers, force, threads, &move |n| {
            if let Some(b) = &b {
                b.set_position(n)
            }
        })
        .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    summarise("get", outcomes, planned_failures, started)
}

async fn tail(c: Client, follow: bool, path: String) -> Result<(), Error> {
    use tokio::io::AsyncWriteExt;
    let mut out = tokio::io::stdout();
    let st = c.stat(&path, true).await?;
    let mut shown = st.size;
    c.get_range(
        &st,
        st.size.saturating_sub(1024),
        st.size,
        &mut out,
        &|_| {},
    )
    .await?;
    out.flush().await.map_err(|e| Error::local("stdout", e))?;
    if !follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let st = c.stat(&path, true).await?;
        if st.size > shown {
            c.get_range(&st, shown, st.size, &mut out, &|_| {}).await?;
            out.flush().await.map_err(|e| Error::local("stdout", e))?;
        }
        shown = st.size;
    }
}

async fn getmerge(c: Client, nl: bool, remote: String, local: String) -> Result<(), Error> {
    use tokio::io::AsyncWriteExt;
    let mut files: Vec<_> = c
        .list(&remote)
        .await?
        .into_iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let dest = PathBuf::from(&local);
    let tmp = temp_beside(&dest);
    let result = async {
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Error::local(&tmp, e))?;
        for f in &files {
            c.get(&f.path, &mut out, &|_| {}).await?;
            if nl {
                out.write_all(b"\n")
                    .await
                    .map_err(|e| Error::local(&tmp, e))?;
            }
        }
        out.flush().await.map_err(|e| Error::local(&tmp, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| Error::local(&dest, e))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn cat(c: Client, paths: Vec<String>) -> Result<(), Error> {
    let mut out = tokio::io::stdout();
    for p in expand_all(&c, &paths).await? {
        c.get(&p, &mut out, &|_| {}).await?;
    }
    Ok(())
}

fn kind_str(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Directory => "directory",
    }
}

fn entry_json(s: &FileStatus) -> Value {
    json!({
        "path": s.path,
        "type": kind_str(s.kind),
        "size": s.size,
        "replication": s.replication,
        "block_size": s.block_size,
        "mtime_ms": s.mtime_ms,
        "complete": s.complete,
        "owner": s.owner,
        "group": s.group,
        "mode": lode_protocol::perm::octal(s.mode),
    })
}

fn mtime(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

async fn ls(
    c: Client,
    recursive: bool,
    long: bool,
    json: bool,
    path: Option<String>,
) -> Result<(), Error> {
    let root = path.unwrap_or_else(|| "/".into());
    let mut all = vec![];
    let mut pending = c.expand(&root).await?;
    pending.reverse();
    while let Some(p) = pending.pop() {
        let entries = c.list(&p).await?;
        for e in entries.iter().rev() {
            if recursive && e.kind == EntryKind::Directory {
                pending.push(e.path.clone());
            }
        }
        all.extend(entries);
    }
    if recursive {
        all.sort_by(|a, b| a.path.cmp(&b.path));
    }
    if json {
        println!("{}", Value::Array(all.iter().map(entry_json).collect()));
        return Ok(());
    }
    for e in all {
        let (t, r, size) = match e.kind {
            EntryKind::Directory => ('d', "-".to_string(), "-".to_string()),
            EntryKind::File => ('-', e.replication.to_string(), human::size(e.size)),
        };
        let note = if e.complete { "" } else { "  (being written)" };
        if long {
            let mode = lode_protocol::perm::symbolic(e.mode, e.kind == EntryKind::Directory);
            println!(
                "{mode} {r:>2} {:<10} {:<10} {size:>10}  {}  {}{note}",
                e.owner,
                e.group,
                mtime(e.mtime_ms),
                e.path
            );
            continue;
        }
        println!(
            "{t} {r:>2} {size:>10}  {}  {}{note}",
            mtime(e.mtime_ms),
            e.path
        );
    }
    Ok(())
}

async fn mkdir(c: Client, parents: bool, paths: Vec<String>) -> Result<(), Error> {
    for p in paths {
        c.mkdir(&p, parents).await?;
    }
    Ok(())
}

/// Every path, with remote globs expanded.
async fn expand_all(c: &Client, paths: &[String]) -> Result<Vec<String>, Error> {
    let mut out = vec![];
    for p in paths {
        out.extend(c.expand(p).await?);
    }
    Ok(out)
}

async fn rm(c: Client, recursive: bool, skip_trash: bool, paths: Vec<String>) -> Result<(), Error> {
    for p in expand_all(&c, &paths).await? {
        if skip_trash {
            c.delete(&p, recursive).await?;
        } else {
            c.trash(&p, recursive).await?;
        }
    }
    Ok(())
}

async fn mv(c: Client, src: String, dst: String) -> Result<(), Error> {
    c.rename(&src, &dst).await
}

async fn stat(c: Client, json: bool, blocks: bool, path: String) -> Result<(), Error> {
    // What the caller may not read still has a status, without blocks or a checksum.
    let (st, readable) = match c.stat(&path, true).await {
        Ok(st) => (st, true),
        Err(e) if e.code() == Some(lode_protocol::ErrorCode::PermissionDenied) => {
            (c.stat(&path, false).await?, false)
        }
        Err(e) => return Err(e),
    };
    let checksum = if readable && st.kind == EntryKind::File && st.complete {
        Some(c.checksum_of_status(&st).await?.to_hex())
    } else {
        None
    };
    if json {
        let mut v = json!({
            "path": st.path,
            "type": kind_str(st.kind),
            "size": st.size,
            "replication": st.replication,
            "block_size": st.block_size,
            "checksum": checksum,
            "mtime_ms": st.mtime_ms,
            "complete": st.complete,
            "owner": st.owner,
            "group": st.group,
            "mode": lode_protocol::perm::octal(st.mode),
        });
        if blocks {
            v["blocks"] = Value::Array(
                st.blocks
                    .iter()
                    .map(|b| {
                        json!({
                            "id": b.id,
                            "offset": b.offset,
                            "len": b.len,
                            "locations": b.locations.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            );
        }
        println!("{v}");
        return Ok(());
    }
    println!("path:        {}", st.path);
    println!("type:        {}", kind_str(st.kind));
    if st.kind == EntryKind::File {
        println!("size:        {} ({} bytes)", human::size(st.size), st.size);
        println!("replication: {}", st.replication);
        println!("block size:  {}", human::size(st.block_size));
        println!("blocks:      {}", st.blocks.len());
        if let Some(c) = &checksum {
            println!("checksum:    {c}");
        }
        if !st.complete {
            println!("state:       being written");
        }
    }
    println!(
        "mode:        {} ({})",
        lode_protocol::perm::octal(st.mode),
        lode_protocol::perm::symbolic(st.mode, st.kind == EntryKind::Directory)
    );
    println!("owner:       {}", st.owner);
    println!("group:       {}", st.group);
    println!("modified:    {}", mtime(st.mtime_ms));
    if blocks {
        for b in &st.blocks {
            let locs: Vec<&str> = b.locations.iter().map(|t| t.name.as_str()).collect();
            println!(
                "  block {:>8}  offset {:>12}  len {:>10}  [{}]",
                b.id.to_string(),
                b.offset,
                human::size(b.len),
                locs.join(", ")
            );
        }
    }
    Ok(())
}

async fn du(c: Client, summary: bool, path: Option<String>) -> Result<(), Error> {
    let root = path.unwrap_or_else(|| "/".into());
    let mut targets: Vec<String> = vec![];
    for p in c.expand(&root).await? {
        let st = c.stat(&p, false).await?;
        if summary || st.kind == EntryKind::File || lode_client::bulk::is_glob(&root) {
            targets.push(st.path.clone());
        } else {
            targets.extend(c.list(&st.path).await?.into_iter().map(|e| e.path));
        }
    }
    for p in targets {
        let u = c.du(&p).await?;
        println!(
            "{:>10}  {:>10}  {p}",
            human::size(u.bytes),
            human::size(u.stored_bytes)
        );
    }
    Ok(())
}

async fn count(c: Client, quotas: bool, json: bool, pattern: String) -> Result<(), Error> {
    for path in c.expand(&pattern).await? {
        count_one(&c, quotas, json, path).await?;
    }
    Ok(())
}

async fn count_one(c: &Client, quotas: bool, json: bool, path: String) -> Result<(), Error> {
    let n = c.count(&path).await?;
    let path = lode_protocol::path::normalize(&path).unwrap_or(path);
    if json {
        println!(
            "{}",
            json!({
                "path": path,
                "dirs": n.dirs,
                "files": n.files,
                "bytes": n.bytes,
                "name_quota": n.name_quota,
                "space_quota": n.space_quota,
                "names_used": n.names_used,
                "space_used": n.space_used,
            })
        );
        return Ok(());
    }
    // The columns `hdfs dfs -count [-q]` prints.
    if quotas {
        let limit = |q: Option<u64>| q.map_or("none".to_string(), |v| v.to_string());
        let left = |q: Option<u64>, used: u64| {
            q.map_or("inf".to_string(), |v| {
                (v as i128 - used as i128).to_string()
            })
        };
        print!(
            "{:>12} {:>12} {:>16} {:>16} ",
            limit(n.name_quota),
            left(n.name_quota, n.names_used),
            limit(n.space_quota),
            left(n.space_quota, n.space_used)
        );
    }
    println!("{:>12} {:>12} {:>16} {path}", n.dirs, n.files, n.bytes);
    Ok(())
}

async fn checksum(c: Client, paths: Vec<String>) -> Result<(), Error> {
    for p in paths {
        let h = c.checksum(&p).await?;
        println!(
            "{}  {}",
            h.to_hex(),
            lode_protocol::path::normalize(&p).unwrap_or(p)
        );
    }
    Ok(())
}

fn namenodes_json(namenodes: &[NamenodeReport]) -> serde_json::Value {
    namenodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "addr": n.addr,
                "role": n.role,
                "term": n.term,
                "last_index": n.last_index,
                "applied_index": n.applied_index,
            })
        })
        .collect()
}

async fn namenode_list(c: Client, json: bool) -> Result<(), Error> {
    let r = c.report().await?;
    if json {
        println!("{}", namenodes_json(&r.namenodes));
    } else {
        print_namenodes(&r.namenodes);
    }
    Ok(())
}

async fn report(c: Client, json: bool) -> Result<(), Error> {
    let r = c.report().await?;
    if json {
        let v = json!({
            "safemode": r.safemode,
            "under_replicated": r.under_replicated,
            "missing": r.missing,
            "corrupt": r.corrupt,
            "namenode": { "http_addr": r.http_addr },
            "namenodes": namenodes_json(&r.namenodes),
            "datanodes": r.datanodes.iter().map(|d| json!({
                "name": d.name,
                "state": d.state,
                "addr": d.addr,
                "http_addr": d.http_addr,
                "last_heartbeat_ms": d.last_heartbeat_ms,
                "blocks": d.blocks,
                "capacity": d.capacity,
                "used": d.used,
                "remaining": d.remaining,
                "failed_volumes": d.failed_volumes,
                "sandbox": d.sandbox,
                "sandbox_missing": d.sandbox_missing,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    let capacity: u64 = r.datanodes.iter().map(|d| d.capacity).sum();
    let used: u64 = r.datanodes.iter().map(|d| d.used).sum();
    let remaining: u64 = r.datanodes.iter().map(|d| d.remaining).sum();
    println!(
        "capacity {}  used {}  remaining {}",
        human::size(capacity),
        human::size(used),
        human::size(remaining)
    );
    println!(
        "under-replicated {}  missing {}  corrupt {}  safemode {}",
        r.under_replicated,
        r.missing,
        r.corrupt,
        if r.safemode { "on" } else { "off" }
    );
    print_namenodes(&r.namenodes);
    println!(
        "{:<10} {:<15} {:<22} {:>9} {:>8} {:>10} {:>10} {:>11}",
        "NAME", "STATE", "ADDRESS", "HEARTBEAT", "BLOCKS", "USED", "REMAINING", "FAILED-DIRS"
    );
    for d in &r.datanodes {
        println!(
            "{:<10} {:<15} {:<22} {:>8.1}s {:>8} {:>10} {:>10} {:>11}",
            d.name,
            d.state,
            d.addr,
            d.last_heartbeat_ms as f64 / 1000.0,
            d.blocks,
            human::size(d.used),
            human::size(d.remaining),
            d.failed_volumes
        );
    }
    for d in r.datanodes.iter().filter(|d| !d.sandbox_missing.is_empty()) {
        println!(
            "{}: refuses plugins: its kernel lacks the sandbox protection(s) {}",
            d.name,
            d.sandbox_missing.join(", ")
        );
    }
    Ok(())
}

/// The namenode table of `admin report` and `admin namenode list`; the lag is how far a member's
/// applied index is behind the highest last index any member reported.
fn print_namenodes(namenodes: &[NamenodeReport]) {
    let top = namenodes.iter().map(|n| n.last_index).max().unwrap_or(0);
    println!(
        "{:<10} {:<10} {:<22} {:>6} {:>11} {:>13} {:>8}",
        "NAMENODE", "ROLE", "ADDRESS", "TERM", "LAST-INDEX", "APPLIED-INDEX", "LAG"
    );
    for n in namenodes {
        println!(
            "{:<10} {:<10} {:<22} {:>6} {:>11} {:>13} {:>8}",
            n.name,
            n.role,
            n.addr,
            n.term,
            n.last_index,
            n.applied_index,
            top.saturating_sub(n.applied_index)
        );
    }
}

async fn scan(
    c: Client,
    plugin: String,
    args: Vec<(String, String)>,
    json: bool,
    paths: Vec<String>,
) -> Result<(), Error> {
    let bar = if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} tasks {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let b = bar.clone();
    let progress = move |done: u64, total: u64| {
        if let Some(b) = &b {
            b.set_length(total);
            b.set_position(done);
        }
    };
    let out = c.scan(&plugin, &args, &paths, &progress).await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json {
        let s = &out.stats;
        let v = json!({
            "result": String::from_utf8_lossy(&out.rendered),
            "plugin": { "name": out.plugin.name, "hash": out.plugin.hash.to_hex() },
            "stats": {
                "input_bytes": s.input_bytes,
                "tasks": s.tasks,
                "local_tasks": s.local_tasks,
                "bytes_read_local": s.bytes_read_local,
                "bytes_over_network": s.bytes_over_network,
                "retried_tasks": s.retried_tasks,
                "elapsed_ms": s.elapsed_ms,
            },
        });
        println!("{v}");
    } else {
        use std::io::Write;
        std::io::stdout()
            .write_all(&out.rendered)
            .map_err(|e| Error::local("stdout", e))?;
    }
    Ok(())
}

async fn plugin_cmd(c: Client, command: PluginCommand) -> Result<(), Error> {
    let line = |p: &lode_protocol::messages::PluginRecord| {
        let state = if p.approved {
            "approved"
        } else {
            "waiting for approval"
        };
        format!("{}  {}  {}  added by {}", p.hash, p.name, state, p.added_by)
    };
    match command {
        PluginCommand::Add { file, name } => {
            let p = c.add_plugin(&file, name).await?;
            println!("{}", line(&p));
        }
        PluginCommand::List { json } => {
            let all = c.list_plugins().await?;
            if json {
                let v: Vec<Value> = all
                    .iter()
                    .map(|p| json!({"hash": p.hash.to_hex(), "name": p.name, "path": p.path, "added_by": p.added_by, "approved": p.approved, "added_ms": p.added_ms}))
                    .collect();
                println!("{}", Value::Array(v));
            } else {
                for p in &all {
                    println!("{}", line(p));
                }
            }
        }
        PluginCommand::Approve { hash } => {
            let p = c.approve_plugin(&hash).await?;
            println!("{}", line(&p));
        }
    }
    Ok(())
}

async fn fsck(c: Client, json: bool, path: String) -> Result<(), Error> {
    let r = c.fsck(&path).await?;
    let status = if r.missing > 0 {
        "missing"
    } else if r.corrupt > 0 {
        "corrupt"
    } else if r.under_replicated > 0 {
        "under_replicated"
    } else {
        "healthy"
    };
    if json {
        let v = json!({
            "status": status,
            "files": r.files,
            "blocks": r.blocks,
            "under_replicated": r.under_replicated,
            "missing": r.missing,
            "corrupt": r.corrupt,
            "problems": r.problems.iter().map(|p| json!({
                "path": p.path, "block": p.block, "state": p.state, "locations": p.locations,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        for p in &r.problems {
            println!(
                "{}: block {} {} [{}]",
                p.path,
                p.block,
                p.state,
                p.locations.join(", ")
            );
        }
        println!(
            "{path}: {status}: {} files, {} blocks, {} under-replicated, {} missing, {} corrupt",
            r.files, r.blocks, r.under_replicated, r.missing, r.corrupt
        );
    }
    if r.missing > 0 || r.corrupt > 0 {
        return Err(Error::Invalid(format!(
            "{path}: {} missing and {} corrupt blocks",
            r.missing, r.corrupt
        )));
    }
    Ok(())
}

async fn safemode(c: Client, action: SafeModeArg) -> Result<(), Error> {
    use lode_protocol::messages::SafeModeAction as A;
    let action = match action {
        SafeModeArg::Get => A::Get,
        SafeModeArg::Enter => A::Enter,
        SafeModeArg::Leave => A::Leave,
    };
    let (on, reported, total) = c.safemode(action).await?;
    println!(
        "safe mode is {} ({reported} of {total} blocks reported)",
        if on { "ON" } else { "OFF" }
    );
    Ok(())
}
