#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::service::main(product_svc::Application::build).await
}
