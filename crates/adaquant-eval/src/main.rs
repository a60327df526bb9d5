fn main() {
    println!("adaquant: not yet wired");
}
