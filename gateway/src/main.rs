/// One event-loop thread by default: a proxy does little work per request, and on a
/// machine shared with its services, handing requests between threads cost it more than
/// it gained (see docs/BENCHMARKS.md). More gateways scale it out.
fn main() -> anyhow::Result<()> {
    let settings = shared::Settings::load()?;
    let runtime = match settings.gateway.worker_threads {
        0 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?,
    };
    runtime.block_on(shared::service::serve(
        settings,
        gateway::Application::build,
    ))
}
