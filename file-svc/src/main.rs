#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::service::main(file_svc::Application::build).await
}
