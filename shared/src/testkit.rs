//! Test harness: a real `nats-server` with JetStream on a free loopback port and
//! a temporary store, killed and wiped on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Child,
    port: u16,
    /// How the server was started, to start it again the same way.
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    ///
    /// The binary is `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else the
    /// copy `scripts/install-deps.sh` puts in `~/.cache/natter/bin`.
    pub fn start() -> NatsServer {
        Self::launch(&[], |port, store| {
            let mut args: Vec<std::ffi::OsString> =
                ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"].iter().map(Into::into).collect();
            args.push(store.into());
            args
        })
    }

    /// Starts a server from the config file `config(port, store_dir)` writes,
    /// with `env` (a config's `$VARIABLES`) in its environment.
    pub fn start_with_config(config: impl Fn(u16, &Path) -> String, env: &[(&str, &str)]) -> NatsServer {
        Self::launch(env, |port, store| {
            let path = store.join("nats-server.conf");
            std::fs::write(&path, config(port, &store.join("jetstream"))).expect("write the server config");
            vec!["-c".into(), path.into()]
        })
    }

    fn launch(env: &[(&str, &str)], args: impl Fn(u16, &Path) -> Vec<std::ffi::OsString>) -> NatsServer {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        // A port picked free can be taken by another test's server before ours
        // binds it; a server that exits at once is retried on a new port.
        for _ in 0..5 {
            let store = tempfile::tempdir().expect("temp dir for JetStream store");
            let port = free_port();
            let args = args(port, store.path());
            let mut child = spawn(&args, &env);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if greets(port) {
                    return NatsServer { child, port, args, env, _store: store };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nats-server did not start");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server and starts it again on the same port and store, as
    /// a restarted machine: clients reconnect, and JetStream keeps its data.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            self.child = spawn(&self.args, &self.env);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if greets(self.port) {
                    return;
                }
                // The old process's port may take a moment to free.
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(Instant::now() < deadline, "nats-server did not restart on port {}", self.port);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// How natter's processes reach this server.
    pub fn settings(&self) -> crate::nats::NatsSettings {
        crate::nats::NatsSettings::url(self.url())
    }

    pub async fn connect(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(10))
            .connect(self.url())
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[std::ffi::OsString], env: &[(String, String)]) -> Child {
    Command::new(binary())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server (run scripts/install-deps.sh to install it)")
}

/// Whether a NATS server answers on `port` with its INFO greeting.
fn greets(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    if let Some(path) = on_path {
        return path;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/natter/bin/nats-server")
}

/// Three `nats-server`s on loopback with routes between them and JetStream on
/// each, as deploy/ runs natter across machines. Nodes can be killed one by one.
pub struct NatsCluster {
    nodes: Vec<Option<ClusterNode>>,
    ports: Vec<u16>,
}

struct ClusterNode {
    child: Child,
    _store: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts three nodes named `n1`..`n3` and waits until each accepts clients.
    pub fn start() -> NatsCluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let store = tempfile::tempdir().expect("temp dir for JetStream store");
            let child = Command::new(binary())
                .args(["-a", "127.0.0.1", "-p", &ports[i].to_string(), "-js", "-sd"])
                .arg(store.path())
                .args(["-n", &format!("n{}", i + 1), "--cluster_name", "natter"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i]), "--routes", &route_list])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server (run scripts/install-deps.sh to install it)");
            nodes.push(Some(ClusterNode { child, _store: store }));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &ports {
            while !greets(*port) {
                assert!(Instant::now() < deadline, "cluster node on {port} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        NatsCluster { nodes, ports }
    }

    /// Every node, as the comma-separated server list natter takes in `NATS_URL`.
    pub fn url(&self) -> String {
        self.ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    pub fn settings(&self) -> crate::nats::NatsSettings {
        crate::nats::NatsSettings::url(self.url())
    }

    /// Waits until JetStream has a meta leader and all three nodes, so
    /// replicated streams can be created (a probe stream is made and removed).
    pub async fn wait_for_jetstream(&self) {
        let client = self.settings().connect("cluster-check").await.expect("connect to the cluster");
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = async_nats::jetstream::stream::Config {
            name: "CLUSTER_PROBE".into(),
            subjects: vec!["cluster.probe".into()],
            num_replicas: 3,
            ..Default::default()
        };
        while let Err(e) = js.create_stream(probe.clone()).await {
            assert!(Instant::now() < deadline, "JetStream cannot place a 3-replica stream: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        js.delete_stream("CLUSTER_PROBE").await.expect("remove the probe stream");
    }

    /// The names of the nodes still running.
    pub fn running(&self) -> Vec<String> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).map(|i| format!("n{}", i + 1)).collect()
    }

    /// SIGKILLs the node named `name` (`n1`..`n3`) for good, as a machine that goes away.
    pub fn kill(&mut self, name: &str) {
        let index: usize = name.trim_start_matches('n').parse::<usize>().expect("node name") - 1;
        if let Some(mut node) = self.nodes[index].take() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}
