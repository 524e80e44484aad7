fn main() -> anyhow::Result<()> {
    shared::service::main(file_svc::Application::build)
}
