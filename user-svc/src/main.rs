#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::service::main(user_svc::Application::build).await
}
