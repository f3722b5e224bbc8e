//! The [`Limiter`]: one loaded XDP program and its maps.

use std::collections::HashSet;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{ProgramError, Xdp, xdp::XdpLinkId, xdp::XdpMode},
};
use limiter_common::layout::{
    Bucket, Config, Counter, Limit, PolicyEntry, SourceKey, SourceState, Stat, map_names,
};

use crate::{EBPF_OBJECT, PROGRAM_NAME, policy::CompiledPolicy};

/// Why an operation on the loaded program failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object could not be loaded (verifier, map creation, ...).
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        source: MapError,
    },
    /// The object lacks a map or program this build expects.
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// Load-time settings.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Capacity of the source table; the build default when `None`.
    pub max_sources: Option<u32>,
    /// Capacity of the aggregate table.
    pub max_aggregates: Option<u32>,
}

/// Counter totals over all CPUs, indexed by [`Stat`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub Vec<Counter>);

impl Stats {
    /// The totals of one counter.
    pub fn get(&self, stat: Stat) -> Counter {
        self.0.get(stat as usize).copied().unwrap_or_default()
    }

    /// Packets of one counter.
    pub fn packets(&self, stat: Stat) -> u64 {
        self.get(stat).packets
    }

    /// Packets over all verdict counters: every frame the program has seen.
    pub fn frames(&self) -> u64 {
        Stat::ALL
            .iter()
            .filter(|s| s.is_verdict())
            .map(|s| self.packets(*s))
            .sum()
    }
}

/// The loaded program and its maps.
pub struct Limiter {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    applied: Option<CompiledPolicy>,
}

impl Limiter {
    /// Loads the program into the kernel (not attached anywhere yet).
    pub fn load(options: &LoadOptions) -> Result<Self, Error> {
        let mut loader = EbpfLoader::new();
        if let Some(n) = options.max_sources {
            loader.map_max_entries(map_names::SOURCES, n);
        }
        if let Some(n) = options.max_aggregates {
            loader.map_max_entries(map_names::AGGREGATES, n);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // The logger owns the fd of the program's log buffer: it must live as long as the
        // program, or the program load below fails.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(Error::Missing("program \"limiter\""))?
            .try_into()?;
        program.load()?;
        Ok(Self {
            ebpf,
            logger,
            applied: None,
        })
    }

    /// The program, for attaching or test runs.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Limiter::load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("loaded in Limiter::load")
    }

    /// Attaches the program to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId, Error> {
        Ok(self.program_mut().attach(iface, mode)?)
    }

    /// Detaches a link made by [`Limiter::attach`].
    pub fn detach(&mut self, link: XdpLinkId) -> Result<(), Error> {
        Ok(self.program_mut().detach(link)?)
    }

    /// Takes the program's log reader, for a task that flushes it; keep it alive.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, Error> {
        self.ebpf.map_mut(name).ok_or(Error::Missing(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, Error> {
        self.ebpf.map(name).ok_or(Error::Missing(name))
    }

    /// Writes a compiled policy into the maps.
    ///
    /// New limits and prefixes go in before the config that enables them and stale prefixes
    /// leave after it, so every packet meets either the old or the new entry for a prefix,
    /// never neither.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<(), Error> {
        let previous = self.applied.as_ref().map_or(0, |p| p.limits.len());
        {
            let mut limits: Array<&mut MapData, Limit> =
                Array::try_from(self.map_mut(map_names::LIMITS)?)
                    .map_err(map_err(map_names::LIMITS))?;
            for (i, limit) in policy.limits.iter().enumerate() {
                limits
                    .set(i as u32, limit, 0)
                    .map_err(map_err(map_names::LIMITS))?;
            }
            for i in policy.limits.len()..previous.max(policy.limits.len()) {
                limits
                    .set(i as u32, Limit::default(), 0)
                    .map_err(map_err(map_names::LIMITS))?;
            }
        }
        {
            let map = self.map_mut(map_names::SERVICE_PORTS)?;
            let mut ports: Array<&mut MapData, u32> =
                Array::try_from(map).map_err(map_err(map_names::SERVICE_PORTS))?;
            for &(index, limit_id) in &policy.service_ports {
                ports
                    .set(index, limit_id, 0)
                    .map_err(map_err(map_names::SERVICE_PORTS))?;
            }
        }
        insert_prefixes(
            self.map_mut(map_names::POLICY_V4)?,
            map_names::POLICY_V4,
            &policy.v4,
        )?;
        insert_prefixes(
            self.map_mut(map_names::POLICY_V6)?,
            map_names::POLICY_V6,
            &policy.v6,
        )?;
        {
            let mut config: Array<&mut MapData, Config> =
                Array::try_from(self.map_mut(map_names::CONFIG)?)
                    .map_err(map_err(map_names::CONFIG))?;
            config
                .set(0, policy.config, 0)
                .map_err(map_err(map_names::CONFIG))?;
        }
        remove_stale_prefixes(
            self.map_mut(map_names::POLICY_V4)?,
            map_names::POLICY_V4,
            &policy.v4,
        )?;
        remove_stale_prefixes(
            self.map_mut(map_names::POLICY_V6)?,
            map_names::POLICY_V6,
            &policy.v6,
        )?;
        if let Some(previous) = &self.applied {
            let keep: HashSet<u32> = policy.service_ports.iter().map(|(i, _)| *i).collect();
            let stale: Vec<u32> = previous
                .service_ports
                .iter()
                .map(|(i, _)| *i)
                .filter(|i| !keep.contains(i))
                .collect();
            let mut ports: Array<&mut MapData, u32> =
                Array::try_from(self.map_mut(map_names::SERVICE_PORTS)?)
                    .map_err(map_err(map_names::SERVICE_PORTS))?;
            for index in stale {
                ports
                    .set(index, 0, 0)
                    .map_err(map_err(map_names::SERVICE_PORTS))?;
            }
        }
        self.applied = Some(policy.clone());
        Ok(())
    }

    /// The policy last applied.
    pub fn applied(&self) -> Option<&CompiledPolicy> {
        self.applied.as_ref()
    }

    /// Counter totals over all CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(map_names::STATS)?)
                .map_err(map_err(map_names::STATS))?;
        let mut totals = Vec::with_capacity(Stat::LEN as usize);
        for i in 0..Stat::LEN {
            let per_cpu = stats.get(&i, 0).map_err(map_err(map_names::STATS))?;
            let mut total = Counter::default();
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
            totals.push(total);
        }
        Ok(Stats(totals))
    }

    /// The state of one source, if tracked.
    pub fn source(&self, key: &SourceKey) -> Result<Option<SourceState>, Error> {
        let sources: HashMap<&MapData, SourceKey, SourceState> =
            HashMap::try_from(self.map(map_names::SOURCES)?)
                .map_err(map_err(map_names::SOURCES))?;
        match sources.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::Map {
                map: map_names::SOURCES,
                source: e,
            }),
        }
    }

    /// Every tracked source with its state.
    pub fn sources(&self) -> Result<Vec<(SourceKey, SourceState)>, Error> {
        let sources: HashMap<&MapData, SourceKey, SourceState> =
            HashMap::try_from(self.map(map_names::SOURCES)?)
                .map_err(map_err(map_names::SOURCES))?;
        // Entries evicted while we walk just end the walk early for that key; skip them.
        Ok(sources.iter().filter_map(Result::ok).collect())
    }

    /// Forgets all per-source and aggregate state.
    pub fn clear_state(&mut self) -> Result<(), Error> {
        clear_hash::<SourceState>(self.map_mut(map_names::SOURCES)?, map_names::SOURCES)?;
        clear_hash::<Bucket>(self.map_mut(map_names::AGGREGATES)?, map_names::AGGREGATES)
    }
}

fn clear_hash<V: aya::Pod>(map: &mut aya::maps::Map, name: &'static str) -> Result<(), Error> {
    let mut hash: HashMap<&mut MapData, SourceKey, V> =
        HashMap::try_from(map).map_err(map_err(name))?;
    let keys: Vec<SourceKey> = hash.keys().filter_map(Result::ok).collect();
    for key in keys {
        match hash.remove(&key) {
            // Evicted meanwhile: already gone.
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(Error::Map { map: name, source }),
        }
    }
    Ok(())
}

/// Inserts (or overwrites) every wanted entry of a policy trie.
fn insert_prefixes<K: aya::Pod>(
    map: &mut aya::maps::Map,
    name: &'static str,
    wanted: &[(K, u8, PolicyEntry)],
) -> Result<(), Error> {
    let mut trie: LpmTrie<&mut MapData, K, PolicyEntry> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    for (addr, len, entry) in wanted {
        trie.insert(&Key::new(u32::from(*len), *addr), entry, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

/// Removes every entry of a policy trie that is not wanted.
fn remove_stale_prefixes<K: aya::Pod + Eq + std::hash::Hash>(
    map: &mut aya::maps::Map,
    name: &'static str,
    wanted: &[(K, u8, PolicyEntry)],
) -> Result<(), Error> {
    let mut trie: LpmTrie<&mut MapData, K, PolicyEntry> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    let keep: HashSet<(K, u32)> = wanted.iter().map(|(a, l, _)| (*a, u32::from(*l))).collect();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(&(k.data(), k.prefix_len())))
        .collect();
    for key in stale {
        match trie.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(Error::Map { map: name, source }),
        }
    }
    Ok(())
}
