fn main() -> anyhow::Result<()> {
    shared::service::main(user_svc::Application::build)
}
