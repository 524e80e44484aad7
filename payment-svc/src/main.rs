fn main() -> anyhow::Result<()> {
    shared::service::main(payment_svc::Application::build)
}
