#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::service::main(payment_svc::Application::build).await
}
