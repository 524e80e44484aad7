fn main() -> anyhow::Result<()> {
    shared::service::main(notification_svc::Application::build)
}
