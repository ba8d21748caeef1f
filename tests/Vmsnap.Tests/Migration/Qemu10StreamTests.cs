using System.Net.Sockets;
using Vmsnap.Migration;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>
/// What QEMU 10.0 writes that QEMU 7.2 does not, read from real QEMU 10.0 (64 MiB guests): mapped-ram
/// <c>file:</c> streams (with and without multifd and direct-io), SWITCHOVER_START in <c>migrate</c> streams of
/// current machine types read from a socket, early-setup sections (virtio-mem), and the main channel of a
/// multifd migration.
/// </summary>
[Trait("Category", "Interop")]
public sealed class Qemu10StreamTests
{
    private const long RamBytes = 64 << 20;

    /// <summary>The mapped-ram variants QEMU 10 writes: capabilities, and direct-io (mapped-ram + multifd only).</summary>
    public static TheoryData<string, string> MappedRamCases => new()
    {
        { "none", "mapped-ram" },
        { "none", "mapped-ram,multifd" },
        { "none", "mapped-ram,multifd,direct-io" },
        { "pc", "mapped-ram" },
        { "q35", "mapped-ram,multifd" },
    };

    internal static string MachineOf(string kind) => kind switch
    {
        "pc" => QemuInstall.Current.PcMachine,
        "q35" => QemuInstall.Current.Q35Machine,
        _ => kind,
    };

    /// <summary>
    /// QEMU migrates a paused guest whose RAM is <paramref name="ram"/> to <paramref name="file"/> with <c>migrate file:</c>
    /// and the capabilities given ("direct-io" is the parameter); returns what QEMU says it transferred.
    /// </summary>
    internal static long QemuMappedRamFile(string machine, string ram, string file, string variant, string[]? extra = null)
    {
        string[] parts = variant.Split(',');
        string[] capabilities = parts.Where(p => p != "direct-io").ToArray();
        var parameters = new Dictionary<string, object>();
        if (parts.Contains("direct-io")) parameters["direct-io"] = true;
        if (parts.Contains("multifd")) parameters["multifd-channels"] = 2;
        using var vm = QemuVm.Start([.. QemuVm.Machine(machine, ram, RamBytes), .. extra ?? []], paused: true);
        var figures = vm.MigrateToFileUri(file, capabilities, parameters.Count > 0 ? parameters : null);
        vm.Quit();
        return figures?["transferred"]?.GetValue<long>() ?? throw new InvalidOperationException("QEMU gave no transferred figure");
    }

    [QemuTheory(Since = "10.0")]
    [MemberData(nameof(MappedRamCases))]
    public void A_QEMU_mapped_ram_file_lists_its_blocks_and_loads_the_RAM_QEMU_had(string kind, string variant)
    {
        using var dir = new TempDir();
        string machine = MachineOf(kind);
        string ram = dir.File("ram0");
        long zeroPages = GuestRam.Create(ram, RamBytes, seed: 51);
        string file = dir.File("mapped.mig");
        QemuMappedRamFile(machine, ram, file, variant);

        MigrationStreamInfo info = Inspect(file);
        Assert.Equal(machine, info.MachineType);
        Assert.True(info.IsMappedRam);
        Assert.Equal(["mapped-ram"], info.Capabilities);
        RamBlockSummary ram0 = info.RamBlocks.Single(b => b.Id == "ram0");
        Assert.Equal(RamBytes, ram0.Length);
        // QEMU leaves zero pages out (their bits clear); it found exactly the pages that are zero.
        Assert.Equal(zeroPages, ram0.ZeroPages);
        Assert.Equal(RamBytes / 4096 - zeroPages, ram0.Pages);
        Assert.All(info.RamBlocks, b => Assert.Equal(0, b.PagesOffset!.Value % (1 << 20)));
        if (kind != "none") Assert.Contains(info.RamBlocks, b => b.Id == "pc.bios");
        Assert.Null(info.DeviceStateProblem);

        string loaded = dir.File("loaded");
        ReadInto(file, ("ram0", loaded));
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
    }

    [QemuFact(Since = "10.0")]
    public void A_mapped_ram_file_rewritten_as_a_plain_stream_loads_in_QEMU_with_incoming()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 52);
        string file = dir.File("mapped.mig");
        QemuMappedRamFile(QemuInstall.Current.PcMachine, ram, file, "mapped-ram,multifd");

        string plain = dir.File("plain.mig");
        MigrationStreamInfo info = ReadFile(file, r => WriteFile(plain, w => MigrationStream.Copy(r, w, MigrationStreamFormat.Plain)));
        Assert.True(info.IsMappedRam);
        MigrationStreamInfo rewritten = Inspect(plain);
        Assert.Empty(rewritten.Capabilities);
        Assert.Equal(info.RamBlocks.Select(b => (b.Id, b.Length, b.Pages + b.ZeroPages)), rewritten.RamBlocks.Select(b => (b.Id, b.Length, b.Pages + b.ZeroPages)));
        Assert.Equal(info.Devices.Select(d => d.Name), rewritten.Devices.Select(d => d.Name));

        string loaded = dir.File("loaded");
        QemuVm.LoadStream(QemuVm.MachinePc(loaded, RamBytes), plain);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
    }

    [QemuTheory]
    [InlineData("pc")]
    [InlineData("q35")]
    public async Task A_migrate_stream_of_a_current_machine_type_copies_from_a_socket_and_loads_back(string kind)
    {
        // What live savevm (issue 9) relies on: MigrationStream.Copy reading QEMU's migrate stream from a socket,
        // SWITCHOVER_START included where QEMU 10 sends it.
        using var dir = new TempDir();
        string machine = MachineOf(kind);
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 53);
        string socketPath = Path.Combine("/tmp", "vmsnap-mig-" + Guid.NewGuid().ToString("N")[..10] + ".sock");
        string copy = dir.File("copy.mig");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            listener.Bind(new UnixDomainSocketEndPoint(socketPath));
            listener.Listen(1);
            using var vm = QemuVm.Start(QemuVm.Machine(machine, ram, RamBytes), paused: true);
            Task<MigrationStreamInfo> receive = Task.Run(() =>
            {
                using Socket connection = listener.Accept();
                using var backend = VmStateBackend.ForSocket(connection, ownsSocket: false);
                using var reader = new VmStateReader(backend);
                return WriteFile(copy, w => MigrationStream.Copy(reader, w));
            });
            vm.Migrate($"unix:{socketPath}");
            MigrationStreamInfo info = await receive.WaitAsync(TimeSpan.FromMinutes(2));
            vm.Quit();
            Assert.Equal(machine, info.MachineType);
            Assert.Equal(QemuInstall.Current.WritesSwitchoverStart(machine),
                info.Sections.Any(s => s.Kind == MigrationSectionKind.Command && s.Name == "SWITCHOVER_START"));
            Assert.Null(info.DeviceStateProblem);
        }
        finally
        {
            File.Delete(socketPath);
        }
        string loaded = dir.File("loaded");
        QemuVm.LoadStream(QemuVm.Machine(machine, loaded, RamBytes), copy);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
    }

    [QemuFact(Since = "10.0")]
    public void QEMU_7_2_refuses_SWITCHOVER_START_so_vmsnap_writes_it_only_for_machine_types_that_need_QEMU_10()
    {
        // QEMU 10 puts SWITCHOVER_START into its streams of machine none; QEMU 7.2 has machine none too but does not
        // know the command. This is why vmsnap's own machine-none streams leave it out (QEMU 10 loads them without it).
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, 16 << 20, seed: 54);
        string stream = dir.File("none10.mig");
        QemuVm.SaveStream(QemuVm.MachineNone(ram, 16 << 20), stream);
        Assert.Contains(Inspect(stream).Sections, s => s.Kind == MigrationSectionKind.Command);
        using (QemuInstall.Use("7.2"))
        {
            var e = Assert.Throws<QemuException>(() => QemuVm.LoadStream(QemuVm.MachineNone(dir.File("t72"), 16 << 20), stream));
            Assert.Contains("MIG_CMD 0xb unknown", e.Message);
        }

        using var profile = MachineProfile.Create("none", Ram(("ram0", ram)));
        string ours = dir.File("ours.mig");
        MigrationStreamInfo written = WriteFile(ours, w => MigrationStream.Write(w, profile));
        Assert.DoesNotContain(written.Sections, s => s.Kind == MigrationSectionKind.Command);
        foreach (string v in QemuInstall.All.Select(i => i.Version))
        {
            using var __ = QemuInstall.Use(v);
            string loaded = dir.File("loaded" + v);
            QemuVm.LoadStream(QemuVm.MachineNone(loaded, 16 << 20), ours);
            Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
        }
    }

    /// <summary>A PC with a virtio-mem device (plugged 16 MiB of 128 MiB): QEMU 8.0+ saves its early-setup state before RAM's parts.</summary>
    internal static string[] VirtioMem =>
    [
        "-m", "64M,maxmem=1G", "-object", "memory-backend-ram,id=mem1,size=128M",
        "-device", "virtio-mem-pci,id=vmem0,memdev=mem1,requested-size=16M",
    ];

    [QemuFact(Since = "10.0")]
    public void A_stream_with_an_early_setup_section_is_read_copied_byte_for_byte_and_loads()
    {
        using var dir = new TempDir();
        string ram = dir.File("ram0");
        GuestRam.Create(ram, RamBytes, seed: 55);
        string stream = dir.File("vmem.mig");
        using (var vm = QemuVm.Start([.. QemuVm.MachinePc(ram, RamBytes), .. VirtioMem], paused: true))
        {
            vm.MigrateToFile(stream);
            vm.Quit();
        }
        MigrationStreamInfo info = Inspect(stream);
        MigrationSectionInfo early = Assert.Single(info.Sections, s => s.Kind == MigrationSectionKind.EarlySetup);
        Assert.EndsWith("/virtio-mem-device-early", early.Name);
        // Where QEMU 10 puts it: right after the RAM section's start, before its first part.
        MigrationSectionInfo ramSection = info.Sections.Single(s => s.Kind == MigrationSectionKind.Ram);
        Assert.True(early.Offset > ramSection.Offset);
        // Its length, found by its footer, is the one the VM description gives.
        Assert.Null(info.DeviceStateProblem);
        Assert.Contains(info.RamBlocks, b => b.Id.EndsWith("/mem1", StringComparison.Ordinal));

        string copy = dir.File("copy.mig");
        ReadFile(stream, r => WriteFile(copy, w => MigrationStream.Copy(r, w)));
        Assert.Equal(GuestRam.Hash(stream), GuestRam.Hash(copy));
        string loaded = dir.File("loaded");
        QemuVm.LoadStream([.. QemuVm.MachinePc(loaded, RamBytes), .. VirtioMem], copy);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));
    }

    [QemuFact(Since = "10.0")]
    public async Task The_main_channel_of_a_multifd_migration_is_refused_naming_multifd()
    {
        // QEMU sends MULTIFD_FLUSH records on the main channel and the pages on the multifd channels: a reader of
        // one channel cannot have the RAM.
        using var dir = new TempDir();
        string socketPath = Path.Combine("/tmp", "vmsnap-mfd-" + Guid.NewGuid().ToString("N")[..10] + ".sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var channels = new List<MemoryStream>();
        try
        {
            listener.Bind(new UnixDomainSocketEndPoint(socketPath));
            listener.Listen(8);
            using var vm = QemuVm.Start(QemuVm.MachineNone(dir.File("ram"), 16 << 20), paused: true);
            var accepting = Task.Run(async () =>
            {
                var reads = new List<Task>();
                for (int i = 0; i < 3; i++)
                {
                    Socket s = await listener.AcceptAsync();
                    var buffer = new MemoryStream();
                    lock (channels) channels.Add(buffer);
                    reads.Add(Task.Run(async () =>
                    {
                        using var ns = new NetworkStream(s, ownsSocket: true);
                        await ns.CopyToAsync(buffer);
                    }));
                }
                await Task.WhenAll(reads);
            });
            vm.Execute("migrate-set-capabilities", new Dictionary<string, object>
            {
                ["capabilities"] = new[] { new Dictionary<string, object> { ["capability"] = "multifd", ["state"] = true } },
            });
            vm.Execute("migrate-set-parameters", new Dictionary<string, object> { ["multifd-channels"] = 2 });
            vm.Migrate($"unix:{socketPath}");
            await accepting.WaitAsync(TimeSpan.FromMinutes(1));
            vm.Quit();
        }
        finally
        {
            File.Delete(socketPath);
        }
        byte[] main = channels.Select(c => c.ToArray()).Single(b => b.Length > 4 && b[0] == (byte)'Q' && b[1] == (byte)'E' && b[2] == (byte)'V');
        var e = Assert.Throws<MigrationStreamException>(() => ReadBytes(main, r => MigrationStream.Inspect(r)));
        Assert.Contains("MULTIFD_FLUSH (0x200)", e.Message);
        Assert.Contains("multifd channels", e.Message);
    }
}
