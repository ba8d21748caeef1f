using Vmsnap.Cli.Commands;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// The VM-state area against a real QEMU 7.2 (device-less guest, RAM in a file, the image as
/// <c>-drive file=IMAGE,if=none,id=d0</c>): QEMU's savevm read by vmsnap, vmsnap's snapshots loaded by
/// QEMU's loadvm. VM-state streams are compared by meaning (DESIGN.md measured that a savevm stream
/// and a migration stream of the same state are equivalent but not byte-identical).
/// </summary>
[Trait("Category", "Unit")]
public class VmStateQemuTests
{
    private const long RamBytes = 32 << 20;

    private static string[] Vm(string ram, string image) =>
        [.. QemuVm.MachineNone(ram, RamBytes), "-drive", $"file={image},if=none,id=d0,format=qcow2"];

    private static string CreateRam(TempDir dir, string name, int seed)
    {
        string path = dir.File(name);
        GuestRam.Create(path, RamBytes, seed);
        return path;
    }

    private static string EmptyRam(TempDir dir, string name) => Qemu.SparseRaw(dir, name, RamBytes);

    private static (MigrationStreamInfo Info, string Ram) ReadStream(string stream, TempDir dir, string name)
    {
        string ram = dir.File(name);
        using var sink = new RamFileSink([new KeyValuePair<string, string>("ram0", ram)]);
        using var device = FileBlockDevice.Open(stream);
        using var backend = VmStateBackend.ForBlockDevice(device);
        using var reader = new VmStateReader(backend);
        return (MigrationStream.Read(reader, sink), ram);
    }

    private static string[] DeviceSections(MigrationStreamInfo info) =>
        info.Sections.Where(s => s.Kind == MigrationSectionKind.Device).Select(s => s.Name).ToArray();

    [QemuFact]
    public void Vmsnap_reads_the_vm_state_of_a_qemu_savevm_snapshot()
    {
        using var dir = new TempDir();
        string image = dir.File("vm.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 0x3c 1M 2M");
        string ram = CreateRam(dir, "ram0", seed: 41);
        using (var vm = QemuVm.Start(Vm(ram, image), paused: true))
        {
            vm.Hmp("savevm before");
            vm.Hmp("savevm second");
            vm.Quit();
        }
        Tool.QemuImg("snapshot", "-c", "diskonly", image);

        // Listed exactly as qemu-img lists them (savevm leaves ICOUNT blank, qemu-img -c writes 0).
        string ours;
        string vmState = dir.File("ours.vmstate");
        Qcow2Snapshot before;
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            ours = SnapshotCommands.FormatList(img.Snapshots);
            SnapshotKit.AssertSameAsQemuInfo(img.Snapshots, image);
            before = img.FindSnapshot("before")!;
            Assert.True(before.VmStateSize > RamBytes / 2, $"savevm wrote {before.VmStateSize} bytes");
            Assert.Equal(-1, before.Icount);
            Assert.Equal(0, img.FindSnapshot("diskonly")!.Icount);

            using Qcow2VmStateArea area = img.OpenVmStateAreaForReading(before);
            Assert.Equal(before.VmStateSize, area.Length);
            Assert.True(area.IsReadOnly);
            using var output = new FileStream(vmState, FileMode.Create);
            using var buffer = new AlignedBuffer(1 << 20);
            long position = 0;
            while (true)
            {
                int n = area.Read(buffer.GetSpan(), position);
                if (n == 0) break;
                output.Write(buffer.GetSpan()[..n]);
                position += n;
            }
            Assert.Equal(before.VmStateSize, position);
            // Through the read-ahead reader (several aligned reads in flight), the stream ends where the snapshot says.
            using var backend = VmStateBackend.ForBlockDevice(area);
            using var reader = new VmStateReader(backend);
            Assert.Equal(before.VmStateSize, MigrationStream.Inspect(reader).TotalBytes);
        }
        SnapshotKit.AssertSameListing(Tool.QemuImg("snapshot", "-l", image), ours);
        Tool.Result cli = VmsnapCli.Run(["snapshot", "list", image]);
        SnapshotKit.AssertSameListing(Tool.QemuImg("snapshot", "-l", image), cli.Stdout);

        // What QEMU streams for the same state: -loadvm, then migrate to a file.
        string theirs = dir.File("theirs.mig");
        string loadedRam = EmptyRam(dir, "loaded-ram0");
        using (var vm = QemuVm.Start([.. Vm(loadedRam, image), "-loadvm", "before"], paused: true))
        {
            vm.MigrateToFile(theirs);
            vm.Quit();
        }
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loadedRam));

        (MigrationStreamInfo ourInfo, string ourRam) = ReadStream(vmState, dir, "from-ours");
        (MigrationStreamInfo theirInfo, string theirRam) = ReadStream(theirs, dir, "from-theirs");
        Assert.Equal(new FileInfo(vmState).Length, ourInfo.TotalBytes);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(ourRam));
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(theirRam));
        Assert.Equal(theirInfo.MachineType, ourInfo.MachineType);
        Assert.Equal(theirInfo.RamBlocks.Select(b => (b.Id, b.Length)), ourInfo.RamBlocks.Select(b => (b.Id, b.Length)));
        Assert.Equal(DeviceSections(theirInfo), DeviceSections(ourInfo));
        Assert.NotEmpty(DeviceSections(ourInfo));

        // QEMU itself takes the bytes vmsnap read as an incoming migration.
        string incomingRam = EmptyRam(dir, "incoming-ram0");
        QemuVm.LoadStream(QemuVm.MachineNone(incomingRam, RamBytes), vmState);
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(incomingRam));

        // Deleting QEMU's snapshots with VM state leaves nothing behind.
        using (var img = Qcow2Image.Open(image))
        {
            img.DeleteSnapshot("before");
            img.DeleteSnapshot("second");
        }
        QemuImgCheck.AssertClean(image);
        Assert.Equal(["diskonly"], SnapshotKit.QemuList(image).Select(r => r.Tag));
    }

    [QemuTheory]
    [InlineData("", false)]
    [InlineData("cluster_size=2M", true)]
    [InlineData("cluster_size=4k,extended_l2=off,refcount_bits=8", false)]
    public void Qemu_loadvm_takes_a_snapshot_whose_vm_state_vmsnap_wrote(string options, bool direct)
    {
        using var dir = new TempDir();
        string image = dir.File("ours.qcow2");
        Qemu.Create(image, 64 << 20, options);
        Qemu.Io(image, "write -P 0x5a 0 3M");
        string ram = CreateRam(dir, "ram0", seed: 42);
        string stream = dir.File("source.mig");
        QemuVm.SaveStream(Vm(ram, image), stream);
        long streamBytes = new FileInfo(stream).Length;

        Qcow2Snapshot made;
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { Direct = direct }))
        {
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            Assert.Equal(img.Engine.VmStateOffset, area.GuestOffset);
            using (var backend = VmStateBackend.ForBlockDevice(area))
            using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = 8, BufferSize = 1 << 20 }))
            using (var source = FileBlockDevice.Open(stream))
            using (var sourceBackend = VmStateBackend.ForBlockDevice(source))
            using (var reader = new VmStateReader(sourceBackend))
            {
                Assert.Equal(VmStateWriteMode.Buffered, writer.Mode);
                MigrationStreamInfo copied = MigrationStream.Copy(reader, writer);
                writer.Close();
                Assert.Equal(streamBytes, copied.TotalBytes);
            }
            Assert.Equal(streamBytes, area.Length);
            area.Flush();
            made = img.CreateSnapshot("vmsnap-state", new Qcow2SnapshotCreateOptions { VmStateSize = streamBytes, VmClock = 2_345_000_000 });
            Assert.Throws<OperationRefusedException>(() => area.Write(new byte[4096], 0));   // the snapshot owns it now
            // The active disk no longer maps the VM-state area: the next save writes fresh clusters.
            Qcow2Engine e = img.Engine;
            for (long i = e.State.Geometry.L1EntriesFor(e.State.VirtualSize); i < e.State.ActiveL1.Size; i++) Assert.Equal(0UL, e.State.ActiveL1[i]);
        }
        QemuImgCheck.AssertClean(image);
        SnapshotRow row = Assert.Single(SnapshotKit.QemuList(image));
        Assert.Equal(SnapshotCommands.FormatVmSize((ulong)streamBytes), row.VmSize);
        Assert.Equal(SnapshotKit.ListedClock("00:00:02.345"), row.VmClock);
        Assert.Equal(streamBytes, Assert.Single(SnapshotKit.QemuInfo(image)).VmStateSize);

        string loadedRam = EmptyRam(dir, "loaded-ram0");
        // -loadvm runs before QMP answers (QEMU exits if it fails): by then the RAM file is loaded.
        using (var vm = QemuVm.Start([.. Vm(loadedRam, image), "-loadvm", made.Name], paused: true))
            vm.Quit();
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loadedRam));

        // vmsnap reads back exactly the bytes it wrote, and deleting the snapshot frees them all.
        using (var img = Qcow2Image.Open(image))
        {
            using (Qcow2VmStateArea area = img.OpenVmStateAreaForReading("vmsnap-state"))
            {
                byte[] back = new byte[streamBytes];
                Assert.Equal((int)streamBytes, area.Read(back, 0));
                Assert.Equal(0, area.Read(new byte[10], streamBytes));
                Assert.True(File.ReadAllBytes(stream).AsSpan().SequenceEqual(back));
            }
            img.DeleteSnapshot(made.Id);
        }
        QemuImgCheck.AssertClean(image);
    }
}
