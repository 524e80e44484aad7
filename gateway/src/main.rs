#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::service::main(gateway::Application::build).await
}
