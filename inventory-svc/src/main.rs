fn main() -> anyhow::Result<()> {
    shared::service::main(inventory_svc::Application::build)
}
