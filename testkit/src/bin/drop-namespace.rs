//! Deletes the databases, queues and exchanges of `COMMERCE__NAMESPACE`: the cleanup of
//! the benchmark scripts, whose services' relays declare every subscriber's queue.

fn main() -> anyhow::Result<()> {
    let settings = shared::Settings::load()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(testkit::drop_namespace(&settings.namespace, &settings, []))
}
