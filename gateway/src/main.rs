/// Event loops of one thread each, like nginx's workers: a connection's requests never
/// move between threads (see docs/BENCHMARKS.md).
fn main() -> anyhow::Result<()> {
    let settings = shared::Settings::load()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(shared::service::serve(
        settings,
        gateway::Application::build,
    ))
}
