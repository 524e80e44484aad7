fn main() -> anyhow::Result<()> {
    shared::service::main(order_svc::Application::build)
}
