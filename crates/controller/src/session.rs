//! One agent's control stream, from its `Hello` to its disconnection.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};

use vane_proto::api::InstanceState;
use vane_proto::stream::{FromAgent, ToAgent};
use vane_proto::validate;

use crate::agents::Outgoing;
use crate::{now, workflow, Controller};

pub async fn run(c: Arc<Controller>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let hello = match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<FromAgent>(&t).ok(),
        _ => None,
    };
    let Some(FromAgent::Hello {
        name,
        locator,
        public_key,
        gateway,
        auth,
        instances,
    }) = hello
    else {
        tracing::warn!("agent connection without a valid hello, closed");
        return;
    };
    let admitted = validate::name("host name", &name)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            let mut s = c.state();
            let (credential, batch) = s
                .admit_host(&name, &public_key, &auth, now())
                .map_err(|e| e.to_string())?;
            c.commit(batch).map_err(|e| e.to_string())?;
            Ok(credential)
        });
    let credential = match admitted {
        Ok(credential) => credential,
        Err(reason) => {
            tracing::warn!(host = %name, "agent refused: {reason}");
            let refused = serde_json::to_string(&ToAgent::Refused { reason }).expect("serializes");
            let _ = sink.send(Message::Text(refused.into())).await;
            let _ = sink.close().await;
            return;
        }
    };

    let (epoch, mut rx, overflow) = c.streams.attach(&name);
    let (host_id, unknown) = {
        let mut s = c.state();
        let mut batch = s.host_online(&name, locator, Some(&public_key), now());
        let (endpoint, refused) = s.host_gateway(&name, gateway);
        if let Some(why) = refused {
            tracing::warn!(host = %name, "agent's WireGuard endpoint ignored: {why}");
        }
        batch.extend(endpoint);
        let (reconciled, unknown) = s.reconcile(&name, &instances);
        if let Err(e) = c.commit(batch).and_then(|_| c.commit(reconciled)) {
            tracing::error!(host = %name, "cannot record host: {e}");
        }
        (s.hosts[&name].id, unknown)
    };
    tracing::info!(host = %name, ?locator, instances = instances.len(), "agent connected");
    let config = c.state().config.clone();
    // The store does not know these (they were removed while the host was away, or the
    // store was replaced), or places them on another host (it was declared dead, or a
    // migration moved them): the host ends and removes them before it reads anything
    // after the welcome, views included, rather than keep orphans or second copies.
    for id in &unknown {
        tracing::warn!(host = %name, instance = %id, "host has an instance that is not its own, removing it");
    }
    c.streams.send(
        &name,
        ToAgent::Welcome {
            host_id,
            config,
            credential,
            stale: unknown,
        },
    );
    c.push_views();
    // Programs that ended while the controller did not hear start again where their
    // policy says so.
    let waiting = c.state().restarts_wanted_on(&name);
    for id in waiting {
        workflow::schedule_restart(&c, &id);
    }

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let sent = match msg {
                Outgoing::Json(m) => {
                    let text = serde_json::to_string(&m).expect("messages serialize");
                    sink.send(Message::Text(text.into())).await
                }
                Outgoing::Ping => sink.send(Message::Ping(Vec::new().into())).await,
                Outgoing::Close => break,
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let mut shutdown = c.shutdown.subscribe();
    // The agent answers pings: a host that answers nothing for the grace period (powered
    // off, cut off: no FIN ever comes) is as good as gone, and dead at once. The period
    // counts from a ping that went out, not from what was last heard: a controller that
    // stalled itself (every worker waiting on a commit that etcd held through its own
    // election) asked nothing meanwhile, and must not take its hosts for dead.
    let grace = c.host_grace;
    let mut heartbeat = tokio::time::interval((grace / 4).max(HEARTBEAT_MIN));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    // The first ping sent since the agent was last heard.
    let mut unanswered: Option<tokio::time::Instant> = None;
    let mut silent = false;
    loop {
        let msg = tokio::select! {
            // What has arrived is read before the silence is judged.
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            () = overflow.notified() => {
                tracing::warn!(host = %name, "agent is not keeping up with its control stream, disconnecting it");
                break;
            }
            m = stream.next() => m,
            _ = heartbeat.tick() => {
                if unanswered.is_some_and(|asked| asked.elapsed() >= grace) {
                    tracing::warn!(host = %name, "agent silent for {grace:?}, disconnecting it");
                    silent = true;
                    break;
                }
                c.streams.ping(&name);
                unanswered.get_or_insert_with(tokio::time::Instant::now);
                continue;
            }
        };
        let Some(Ok(msg)) = msg else { break };
        heard = tokio::time::Instant::now();
        unanswered = None;
        match msg {
            Message::Text(t) => match serde_json::from_str::<FromAgent>(&t) {
                Ok(m) => handle(&c, &name, m),
                Err(e) => tracing::warn!(host = %name, "bad message from agent: {e}"),
            },
            Message::Binary(_) => tracing::warn!(host = %name, "binary message ignored"),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
    writer.abort();
    if c.streams.detach(&name, epoch) {
        {
            let mut s = c.state();
            let batch = s.host_offline(&name, now());
            if let Err(e) = c.commit(batch) {
                tracing::error!(host = %name, "cannot record host offline: {e}");
            }
        }
        tracing::info!(host = %name, "agent disconnected");
        // Not when the controller itself stops: the next one counts from its start.
        if !*c.shutdown.borrow() {
            let wait = if silent {
                Duration::ZERO
            } else {
                grace.saturating_sub(heard.elapsed())
            };
            workflow::watch_silence(&c, &name, epoch, wait);
        }
    }
}

/// The shortest interval between pings to an agent.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);

fn handle(c: &Arc<Controller>, host: &str, msg: FromAgent) {
    match msg {
        FromAgent::Hello { .. } => tracing::warn!(host, "second hello ignored"),
        FromAgent::Lookup { net, ip } => {
            // A lookup for an instance frozen by a migration waits for it (`Controller::thaw`).
            if let Some(member) = c.state().lookup_or_wait(host, net, ip) {
                c.streams.send(host, ToAgent::Resolved { net, ip, member });
            }
        }
        FromAgent::Response { id, result } => c.streams.resolve(host, id, result),
        FromAgent::Progress { id, bytes } => c.streams.progress(host, id, bytes),
        FromAgent::Report(report) => {
            let changed = {
                let mut s = c.state();
                match s.apply_report(host, &report) {
                    Some(batch) => {
                        if let Err(e) = c.commit(batch) {
                            tracing::error!(host, "cannot record report: {e}");
                        }
                        true
                    }
                    None => false,
                }
            };
            if changed {
                c.push_views();
                if report.state == InstanceState::Exited {
                    workflow::schedule_restart(c, &report.id);
                }
            }
        }
    }
}
