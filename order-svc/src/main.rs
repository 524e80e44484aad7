#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::service::main(order_svc::Application::build).await
}
