use klgpu::*;
fn main() -> Result<()> {
    let e = Engine::new()?;
    println!("{:?} subgroups={}", e, e.uses_subgroups());
    let p = [0.1f32, 0.2, 0.7];
    let q = [0.3f32, 0.3, 0.4];
    for m in Measure::ALL {
        let qq = m.uses_q().then_some(&q[..]);
        let g = e.divergence(m, &p, qq, &Options::default())?;
        let c = cpu::divergence(m, &p, qq, &Options::default())?;
        println!("{m:?} gpu={g} cpu={c} rel={}", (g - c).abs() / c);
    }
    let n = 1_000_000;
    let p: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 + 1.0) / (n as f32 * 49.0)).collect();
    let q: Vec<f32> = (0..n).map(|i| ((i % 89) as f32 + 1.0) / (n as f32 * 45.0)).collect();
    for m in Measure::ALL {
        let qq = m.uses_q().then_some(&q[..]);
        let t = std::time::Instant::now();
        let g = e.divergence(m, &p, qq, &Options::default())?;
        let dt = t.elapsed();
        let c = cpu::divergence(m, &p, qq, &Options::default())?;
        println!("N=1e6 {m:?} gpu={g} cpu={c} rel={:e} {:?}", (g - c).abs() / c, dt);
    }
    println!("{:?}", e.kl_divergence(&[0.5, f32::NAN], &[0.5, 0.5]));
    println!("{:?}", e.kl_divergence(&[0.5, 0.5], &[1.0, 0.0]));
    let r = e.rows(Measure::KullbackLeibler, &[0.0, 1.0, 2.0, 5.0, 0.0, 0.0], Some(&[0.0, 1.0, 2.0, 0.0, 5.0, 0.0]), 3, &Options::input(Input::Logits))?;
    println!("{r:?} cpu={:?}", cpu::rows(Measure::KullbackLeibler, &[0.0, 1.0, 2.0, 5.0, 0.0, 0.0], Some(&[0.0, 1.0, 2.0, 0.0, 5.0, 0.0]), 3, &Options::input(Input::Logits))?);
    Ok(())
}
