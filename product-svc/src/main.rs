fn main() -> anyhow::Result<()> {
    shared::service::main(product_svc::Application::build)
}
