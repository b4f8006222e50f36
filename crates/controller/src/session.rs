//! One agent's control stream, from its `Hello` to its disconnection.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};

use vane_proto::stream::{AgentRequest, FromAgent, ToAgent};
use vane_proto::validate;

use crate::agents::Outgoing;
use crate::{now, Controller};

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
        let batch = s.host_online(&name, locator, Some(&public_key), now());
        let (reconciled, unknown) = s.reconcile(&name, &instances);
        if let Err(e) = c.commit(batch).and_then(|_| c.commit(reconciled)) {
            tracing::error!(host = %name, "cannot record host: {e}");
        }
        (s.hosts[&name].id, unknown)
    };
    tracing::info!(host = %name, ?locator, instances = instances.len(), "agent connected");
    let config = c.state().config.clone();
    c.streams.send(
        &name,
        ToAgent::Welcome {
            host_id,
            config,
            credential,
        },
    );
    for id in unknown {
        // The store does not know these (they were removed while the host was away, or the
        // store was replaced), or places them on another host; the host removes them rather
        // than keep orphans or second copies running.
        tracing::warn!(host = %name, instance = %id, "host runs an instance that is not its own, removing it");
        let c = c.clone();
        let host = name.clone();
        tokio::spawn(async move {
            if let Err(e) = c.agents.request(&host, AgentRequest::Remove { id }).await {
                tracing::warn!(host = %host, "removing unknown instance: {e}");
            }
        });
    }
    c.push_views();

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let sent = match msg {
                Outgoing::Json(m) => {
                    let text = serde_json::to_string(&m).expect("messages serialize");
                    sink.send(Message::Text(text.into())).await
                }
                Outgoing::Close => break,
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let mut shutdown = c.shutdown.subscribe();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = shutdown.wait_for(|stop| *stop) => break,
            () = overflow.notified() => {
                tracing::warn!(host = %name, "agent is not keeping up with its control stream, disconnecting it");
                break;
            }
        };
        let Some(Ok(msg)) = msg else { break };
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
        let mut s = c.state();
        let batch = s.host_offline(&name, now());
        if let Err(e) = c.commit(batch) {
            tracing::error!(host = %name, "cannot record host offline: {e}");
        }
        tracing::info!(host = %name, "agent disconnected");
    }
}

fn handle(c: &Controller, host: &str, msg: FromAgent) {
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
            }
        }
    }
}
